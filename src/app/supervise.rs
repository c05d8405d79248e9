//! Supervisor mode, `tidegate [FLAGS] -- CMD ARGS...`: tidegate runs the app as its child and
//! stands in as the container's PID 1. It reaps every zombie (it registers as a child
//! subreaper, so orphaned grandchildren come to it even when it is not PID 1), lets the child
//! write to the same stdout and stderr, sends it SIGTERM only after the drain, SIGKILLs it
//! after `--child-stop-timeout`, and exits with its status.

use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use signal_hook::consts::SIGCHLD;
use signal_hook_tokio::Signals;
use tokio::sync::watch;

/// The child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// No command was given.
    #[error("supervisor mode needs a command after --")]
    NoCommand,
    /// The SIGCHLD handler could not be registered.
    #[error("cannot watch child processes")]
    Signals(#[source] std::io::Error),
    /// The command could not be executed.
    #[error("cannot start {command:?}")]
    Spawn {
        /// The program.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The supervised app process.
#[derive(Debug)]
pub struct Child {
    pid: Pid,
    status: watch::Receiver<Option<i32>>,
}

// === impl SuperviseError ===

impl SuperviseError {
    /// The conventional shell exit code: 127 command not found, 126 not executable.
    pub fn exit_code(&self) -> i32 {
        match self {
            SuperviseError::Spawn { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => 127,
                std::io::ErrorKind::PermissionDenied => 126,
                _ => 1,
            },
            _ => 1,
        }
    }
}

// === impl Child ===

impl Child {
    /// Starts `command` and the reaper. Must be called inside a Tokio runtime.
    pub fn spawn(command: &[String]) -> Result<Child, SuperviseError> {
        let (program, args) = command.split_first().ok_or(SuperviseError::NoCommand)?;
        if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::debug!(%error, "Cannot become a child subreaper; orphans go to init");
        }
        // Registered before the child exists, so its exit cannot be missed.
        let signals = Signals::new([SIGCHLD]).map_err(SuperviseError::Signals)?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| SuperviseError::Spawn {
                command: program.clone(),
                source,
            })?;
        let pid = Pid::from_raw(child.id() as i32);
        // std's Child neither waits nor kills on drop; the reaper collects the status.
        drop(child);
        tracing::info!(pid = pid.as_raw(), command = %program, "Started the app");
        let (tx, status) = watch::channel(None);
        tokio::spawn(reap(signals, pid, tx));
        Ok(Child { pid, status })
    }

    /// The child's process id.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// The exit code, if the child has exited (128 + N when killed by signal N).
    pub fn exit_code(&self) -> Option<i32> {
        *self.status.borrow()
    }

    /// Waits for the child to exit and returns its exit code.
    pub async fn exited(&self) -> i32 {
        let mut status = self.status.clone();
        match status.wait_for(Option::is_some).await {
            Ok(code) => code.unwrap_or(1),
            Err(_) => 1,
        }
    }

    /// SIGTERM, then SIGKILL after `timeout`; returns the exit code.
    pub async fn stop(&self, timeout: Duration) -> i32 {
        if let Some(code) = self.exit_code() {
            return code;
        }
        tracing::info!(pid = self.pid(), "Sending SIGTERM to the app");
        let _ = kill(self.pid, Signal::SIGTERM);
        match tokio::time::timeout(timeout, self.exited()).await {
            Ok(code) => code,
            Err(_elapsed) => {
                tracing::warn!(pid = self.pid(), "App ignored SIGTERM; sending SIGKILL");
                self.kill();
                self.exited().await
            }
        }
    }

    /// SIGKILL, at once.
    pub fn kill(&self) {
        let _ = kill(self.pid, Signal::SIGKILL);
    }
}

/// Reaps every child on each SIGCHLD; reports the supervised one's status.
async fn reap(mut signals: Signals, child: Pid, status: watch::Sender<Option<i32>>) {
    loop {
        // SIGCHLD coalesces: one signal may stand for many exits, so reap until none is left.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => {
                    tracing::info!(pid = pid.as_raw(), code, "App exited");
                    status.send_replace(Some(code));
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == child => {
                    tracing::info!(pid = pid.as_raw(), signal = %signal, "App was killed");
                    status.send_replace(Some(128 + signal as i32));
                }
                Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)) => {
                    tracing::debug!(pid = pid.as_raw(), "Reaped an orphaned process");
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        if signals.next().await.is_none() {
            return;
        }
    }
}
