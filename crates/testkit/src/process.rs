//! Child processes a test or the demo starts (the sidecar, the controller): killed and
//! reaped on drop, so a failing test leaves nothing running.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

/// A running child process; killed and reaped when dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Start `cmd`, collecting its stderr until it exits (the thread's result).
    pub fn spawn_capturing_stderr(
        cmd: &mut Command,
    ) -> std::io::Result<(Self, JoinHandle<String>)> {
        let mut child = cmd.stderr(Stdio::piped()).spawn()?;
        let stderr = child.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut e) = stderr {
                let _ = e.read_to_string(&mut s);
            }
            s
        });
        Ok((Self(child), reader))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
