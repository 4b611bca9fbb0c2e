//! Child processes a test or the demo starts (the sidecar, the controller): killed and
//! reaped on drop, so a failing test leaves nothing running.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

/// A running child process; killed and reaped when dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Start `cmd`, collecting its stderr as it comes, readable while it runs: a test can
    /// wait for a line before it stops the process (a line still queued in the process's
    /// log writer is lost when it is killed).
    pub fn spawn_capturing_stderr(cmd: &mut Command) -> std::io::Result<(Self, StderrTail)> {
        let mut child = cmd.stderr(Stdio::piped()).spawn()?;
        let stderr = child.stderr.take();
        let text = Arc::new(Mutex::new(Vec::new()));
        let sink = text.clone();
        let reader = std::thread::spawn(move || {
            let Some(mut e) = stderr else { return };
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = e.read(&mut buf) {
                // Bytes, decoded when read: a read may end inside a character.
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(&buf[..n]);
            }
        });
        Ok((Self(child), StderrTail { text, reader }))
    }
}

/// A child's stderr so far (see [`ChildGuard::spawn_capturing_stderr`]).
pub struct StderrTail {
    text: Arc<Mutex<Vec<u8>>>,
    reader: JoinHandle<()>,
}

impl StderrTail {
    pub fn contains(&self, needle: &str) -> bool {
        String::from_utf8_lossy(&self.text.lock().unwrap_or_else(PoisonError::into_inner))
            .contains(needle)
    }

    /// Everything, once the process has closed its stderr (exited or was killed).
    pub fn finish(self) -> String {
        let _ = self.reader.join();
        let bytes = std::mem::take(&mut *self.text.lock().unwrap_or_else(PoisonError::into_inner));
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
