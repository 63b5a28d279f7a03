//! The registry's state file: written whole, atomically (temp file, fsync, rename).

use serde::{Deserialize, Serialize};
use shoal_core::registry::Instance;
use shoal_core::Error;
use std::io::Write;
use std::path::Path;

/// What survives a restart.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Persisted {
    pub(crate) index: u64,
    /// Each instance with its lease length in ms.
    pub(crate) instances: Vec<(Instance, u64)>,
}

/// Read the state file. `Ok(None)` when there is none yet; an error, naming the
/// file, when it exists but cannot be read or parsed (never a silent empty start).
pub(crate) fn load(path: &Path) -> Result<Option<Persisted>, Error> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(
                Error::config(format!("cannot read registry state {}", path.display()))
                    .with_source(e),
            )
        }
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::config(format!(
            "registry state {} is corrupt (move it away to start empty)",
            path.display()
        ))
        .with_source(e)
    })
}

pub(crate) fn save(path: &Path, state: &Persisted) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(state)
        .map_err(|e| Error::internal("encoding registry state").with_source(e))?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // The rename is durable only once the directory is synced.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("shoal-store-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("registry.json");
        std::fs::write(&p, b"{\"index\": 3, \"instan").unwrap();
        let err = load(&p).err().unwrap().to_string();
        assert!(
            err.contains("corrupt") && err.contains("registry.json"),
            "{err}"
        );
        assert!(load(&dir.join("none.json")).unwrap().is_none());
        std::fs::remove_dir_all(dir).ok();
    }
}
