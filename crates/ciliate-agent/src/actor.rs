//! A subsystem's state owned by one thread, driven through commands, read
//! through published snapshots (bpfman's command loop, kube-runtime's
//! store): no lock is shared between the writer and its readers.
//!
//! Commands are closures run one after the other on the owning thread
//! (datapath work is blocking: syscalls, netlink, files); a command that
//! changes the state publishes a new snapshot when it is done. Readers
//! take the latest snapshot (an `Arc`) and never wait for a command.
//! Stopping: drop every [`Actor`] handle, or call [`Actor::stop`]; the
//! thread finishes the command it runs and ends.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

/// A command: it runs on the state and publishes a new snapshot (if it
/// changed anything) before it answers, so whoever got the answer reads
/// the change in the next snapshot.
type Job<S, V> = Box<dyn FnOnce(&mut S, &watch::Sender<Arc<V>>) + Send>;

/// Commands the queue holds before senders wait.
const QUEUE: usize = 1024;

/// The handle of a subsystem with state `S` and snapshots `V`.
pub struct Actor<S, V> {
    tx: mpsc::Sender<Job<S, V>>,
    snap: watch::Receiver<Arc<V>>,
    name: &'static str,
}

impl<S, V> Clone for Actor<S, V> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), snap: self.snap.clone(), name: self.name }
    }
}

/// The subsystem has stopped (its thread ended).
#[derive(Debug, thiserror::Error)]
#[error("the {0} subsystem has stopped")]
pub struct Stopped(pub &'static str);

/// The job of a write: run `f`, publish the snapshot `view` makes, then
/// answer (so a caller that got its answer reads its own change).
fn publishing<S: 'static, V: 'static, R: Send + 'static>(
    f: impl FnOnce(&mut S) -> R + Send + 'static,
    view: impl FnOnce(&S) -> V + Send + 'static,
) -> (Job<S, V>, oneshot::Receiver<R>) {
    let (reply, rx) = oneshot::channel();
    let job: Job<S, V> = Box::new(move |s: &mut S, snap: &watch::Sender<Arc<V>>| {
        let r = f(s);
        snap.send_replace(Arc::new(view(s)));
        let _ = reply.send(r);
    });
    (job, rx)
}

impl<S: Send + 'static, V: Send + Sync + 'static> Actor<S, V> {
    /// Start the thread owning `state`; `view` makes a snapshot of it (the
    /// first one right away). `init` runs first on the thread (a restore),
    /// before any command.
    pub fn start(
        name: &'static str,
        mut state: S,
        view: impl Fn(&S) -> V + Send + 'static,
        init: impl FnOnce(&mut S) + Send + 'static,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<Job<S, V>>(QUEUE);
        let (snap_tx, snap) = watch::channel(Arc::new(view(&state)));
        std::thread::Builder::new()
            .name(format!("ciliate-{name}"))
            .spawn(move || {
                init(&mut state);
                snap_tx.send_replace(Arc::new(view(&state)));
                while let Some(job) = rx.blocking_recv() {
                    job(&mut state, &snap_tx);
                }
                tracing::debug!(subsystem = name, "stopped");
            })
            .expect("spawning a subsystem thread");
        Self { tx, snap, name }
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<V> {
        self.snap.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    pub fn watch(&self) -> watch::Receiver<Arc<V>> {
        self.snap.clone()
    }
}

impl<S: Send + 'static, V: Send + Sync + 'static> Actor<S, V> {
    /// Run `f` on the state (in order with every other command) and
    /// publish a snapshot made by `view` afterwards.
    pub async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> R + Send + 'static,
        view: impl FnOnce(&S) -> V + Send + 'static,
    ) -> Result<R, Stopped> {
        let (job, rx) = publishing(f, view);
        self.tx.send(job).await.map_err(|_| Stopped(self.name))?;
        rx.await.map_err(|_| Stopped(self.name))
    }

    /// Run `f` on the state without publishing (a read that needs the
    /// state itself, not a snapshot).
    pub async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> R + Send + 'static,
    ) -> Result<R, Stopped> {
        let (reply, rx) = oneshot::channel();
        let job: Job<S, V> = Box::new(move |s: &mut S, _: &watch::Sender<Arc<V>>| {
            let _ = reply.send(f(s));
        });
        self.tx.send(job).await.map_err(|_| Stopped(self.name))?;
        rx.await.map_err(|_| Stopped(self.name))
    }

    /// [`Actor::write`] from a thread that is not in the runtime.
    pub fn write_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> R + Send + 'static,
        view: impl FnOnce(&S) -> V + Send + 'static,
    ) -> Result<R, Stopped> {
        let (job, rx) = publishing(f, view);
        self.tx.blocking_send(job).map_err(|_| Stopped(self.name))?;
        rx.blocking_recv().map_err(|_| Stopped(self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_never_wait_for_a_command() {
        let a: Actor<u32, u32> = Actor::start("test", 1, |s| *s, |_| {});
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let slow = {
            let a = a.clone();
            tokio::spawn(async move {
                a.write(
                    move |s| {
                        started_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                        *s = 2;
                    },
                    |s| *s,
                )
                .await
            })
        };
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap()).await.unwrap();
        // The command is stuck; the snapshot is there.
        assert_eq!(*a.snapshot(), 1);
        go_tx.send(()).unwrap();
        slow.await.unwrap().unwrap();
        assert_eq!(*a.snapshot(), 2);
        assert_eq!(a.read(|s| *s + 1).await.unwrap(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answered_write_is_in_the_next_snapshot() {
        let a: Actor<u32, u32> = Actor::start("test", 0, |s| *s, |_| {});
        for i in 1..=5000 {
            a.write(move |s| *s = i, |s| *s).await.unwrap();
            assert_eq!(*a.snapshot(), i, "the writer read an older snapshot");
        }
    }
}
