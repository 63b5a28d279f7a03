use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// What `shoal up` is running now, written to `<state_dir>/up.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpState {
    /// The supervisor's own pid.
    pub pid: u32,
    /// The control plane's URL.
    pub control_plane: String,
    /// The gateway's URL.
    pub gateway: String,
    /// Every supervised process.
    pub processes: Vec<ProcessState>,
}

/// One supervised process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessState {
    /// `control-plane`, `gateway` or `<service>#<replica>`.
    pub name: String,
    /// The service it runs, for service processes.
    pub service: Option<String>,
    /// Its pid while running.
    pub pid: Option<u32>,
    /// `starting`, `running`, `restarting`, `crash-loop` or `stopped`.
    pub state: String,
    /// How often it was restarted.
    pub restarts: u32,
    /// How it last ended, when it did.
    pub last_exit: Option<String>,
}

impl UpState {
    /// Read `up.json`, if present and readable.
    pub fn read(path: &Path) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Write atomically (readers never see half a file).
    pub(crate) fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, path)
    }
}
