//! The topic catalogue, `<data_dir>/topics.json`: every topic's spec, replaced
//! atomically (temp file, fsync, rename, fsync of the directory) so a crash leaves
//! the old or the new list, never a mix.

use serde::{Deserialize, Serialize};
use shoal_bus::TopicSpec;
use shoal_core::{Error, ErrorKind, Origin};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const FILE: &str = "topics.json";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    version: u32,
    topics: Vec<SpecFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    name: String,
    partitions: u32,
    retention_bytes: Option<u64>,
    retention_ms: Option<u64>,
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

pub(crate) fn io_error(what: String, e: io::Error) -> Error {
    Error::new(ErrorKind::Io, Origin::Internal, what).with_source(e)
}

/// The topics in `dir`'s catalogue (none when there is no catalogue yet).
pub(crate) fn load(dir: &Path) -> Result<Vec<TopicSpec>, Error> {
    let p = path(dir);
    let text = match fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(format!("reading {}", p.display()), e)),
    };
    let file: CatalogFile = serde_json::from_slice(&text).map_err(|e| {
        Error::internal(format!("topic catalogue {} is unreadable", p.display())).with_source(e)
    })?;
    if file.version != VERSION {
        return Err(Error::internal(format!(
            "topic catalogue {} has version {}; this broker reads version {VERSION}",
            p.display(),
            file.version
        )));
    }
    Ok(file
        .topics
        .into_iter()
        .map(|s| TopicSpec {
            name: s.name,
            partitions: s.partitions,
            retention_bytes: s.retention_bytes,
            retention_ms: s.retention_ms,
        })
        .collect())
}

/// Replaces the catalogue with `topics`, durably. Blocking.
pub(crate) fn store(dir: &Path, topics: &[TopicSpec]) -> Result<(), Error> {
    let file = CatalogFile {
        version: VERSION,
        topics: topics
            .iter()
            .map(|s| SpecFile {
                name: s.name.clone(),
                partitions: s.partitions,
                retention_bytes: s.retention_bytes,
                retention_ms: s.retention_ms,
            })
            .collect(),
    };
    let bytes = serde_json::to_vec_pretty(&file)
        .map_err(|e| Error::internal("encoding the topic catalogue").with_source(e))?;
    let p = path(dir);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let step = |what: &str, e: io::Error| io_error(format!("{what} {}", tmp.display()), e);
    let mut f = File::create(&tmp).map_err(|e| step("creating", e))?;
    f.write_all(&bytes).map_err(|e| step("writing", e))?;
    f.sync_all().map_err(|e| step("syncing", e))?;
    drop(f);
    fs::rename(&tmp, &p).map_err(|e| step("renaming", e))?;
    sync_dir(dir)
}

/// Makes a rename or a new entry in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(format!("syncing directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_roundtrips_and_a_missing_one_is_empty() {
        let dir = std::env::temp_dir().join(format!("shoal-broker-cat-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        assert!(load(&dir).unwrap().is_empty());
        let specs = vec![
            TopicSpec::new("a", 3),
            TopicSpec {
                retention_ms: None,
                retention_bytes: Some(5),
                ..TopicSpec::new("b.dead", 1)
            },
        ];
        store(&dir, &specs).unwrap();
        assert_eq!(load(&dir).unwrap(), specs);
        assert!(!dir.join("topics.json.tmp").exists());
        fs::write(dir.join(FILE), b"{").unwrap();
        assert!(load(&dir).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
