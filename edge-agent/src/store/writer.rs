//! The single writer thread and its async handle.
//!
//! Every write to the store goes through [`StoreHandle`], which sends a command over a
//! bounded channel to one OS thread that owns the [`Store`]. The thread takes the first
//! command, then gathers what arrives for up to `store.commit_window` (up to
//! `store.max_readings_per_commit` readings), and commits it all in one transaction: while
//! one commit is being fsynced, the next group builds up. The window closes early when
//! waiting cannot add anything (see [`super::window`]), so it bounds the delay it adds
//! without throttling publishers that wait for their acknowledgements.
//!
//! Replies are sent only after the commit returned, which is what makes an
//! acknowledgement (PUBACK, HTTP 2xx) a promise.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brume_protocol::Reading;
use tokio::sync::{oneshot, watch};

use super::window::{Gate, Publisher};
use super::{
    ModuleProgress, PublishId, Refusal, SessionOp, Store, StoreError, StoreOptions, StoreReader, StoreSnapshot, Write,
};
use crate::metrics::Metrics;

/// Why an append was not committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// The store refused the readings by policy.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The store cannot write right now (disk full, read-only, I/O error). Retry later.
    #[error("store unavailable ({0}); retry later")]
    Unavailable(&'static str),
    /// The agent is shutting down.
    #[error("agent is shutting down")]
    Closed,
}

impl AppendError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            AppendError::Refused(r) => r.reason(),
            AppendError::Unavailable(k) => k,
            AppendError::Closed => "shutting_down",
        }
    }
}

enum Cmd {
    /// Readings, and the sensor PUBLISH they came from when its session is persistent.
    Append {
        readings: Vec<Reading>,
        /// The MQTT client the readings came from, charged for the streams they create.
        origin: Option<Arc<str>>,
        publish: Option<PublishId>,
        reply: oneshot::Sender<Result<(), AppendError>>,
    },
    /// An MQTT session change; the reply carries [`super::sessions::Sessions::apply`]'s answer.
    Session {
        op: SessionOp,
        reply: oneshot::Sender<Result<bool, AppendError>>,
    },
    /// A module's outputs and progress, committed together; `urgent` (the module is
    /// behind on its input) commits without waiting for the window.
    Module {
        readings: Vec<Reading>,
        progress: ModuleProgress,
        urgent: bool,
        reply: oneshot::Sender<Result<(), AppendError>>,
    },
    Ack(Vec<u64>),
}

/// Capacity of the command queue.
const QUEUE: usize = 1024;

/// Wakes the writer inside a commit window. Inside the window the writer sleeps
/// (`thread::park_timeout`) instead of waiting on the channel, so commands that only join
/// the window (appends, acks) cost no wake-up each: at sensor rates those wake-ups were
/// most of the agent's CPU per reading. What may close the window early wakes it through
/// this: every connection with readings pending gone quiet, an urgent module, a queue half
/// full, the last handle dropped.
struct Alarm {
    thread: std::thread::Thread,
    /// Set with each ring; the writer clears it when it looks.
    rung: Arc<AtomicBool>,
}

impl Alarm {
    fn ring(&self) {
        self.rung.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// Rings the alarm when the last [`StoreHandle`] is dropped, so a writer inside a long
/// window commits and sees the channel closed at once.
struct LastHandle(Arc<Alarm>);

impl Drop for LastHandle {
    fn drop(&mut self) {
        self.0.ring();
    }
}

/// How the writer thread groups commits (from `[store]`).
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// `store.max_readings_per_commit`.
    pub max_per_commit: usize,
    /// `store.retention_interval`.
    pub retention_interval: Duration,
    /// `store.commit_window`: 0 commits whatever is queued at once.
    pub commit_window: Duration,
}

impl WriterOptions {
    /// The writer options of a `[store]` section.
    pub fn from_config(c: &crate::config::StoreConfig) -> WriterOptions {
        WriterOptions {
            max_per_commit: c.max_readings_per_commit,
            retention_interval: c.retention_interval,
            commit_window: c.commit_window,
        }
    }
}

/// Cloneable async handle to the store.
#[derive(Clone)]
pub struct StoreHandle {
    /// Commands to the writer thread; bounded, so producers wait when it falls behind.
    tx: flume::Sender<Cmd>,
    /// The writer's last published snapshot (sent after every commit); cloned for each
    /// caller of [`snapshot`](Self::snapshot).
    snapshot: watch::Receiver<StoreSnapshot>,
    /// Read-only connection, used on blocking threads; the mutex serialises its users.
    reader: Arc<Mutex<StoreReader>>,
    /// Why the store cannot write right now (`None`: it can); set by the writer thread.
    status: watch::Receiver<Option<&'static str>>,
    /// The commit window's view of every MQTT connection, shared with the writer thread
    /// and each connection's [`Publisher`].
    gate: Arc<Gate>,
    /// `store.commit_window`, handed to each [`Publisher`].
    commit_window: Duration,
    /// Wakes the writer thread before its window ends (an urgent command, a queue half
    /// full, the last handle gone).
    alarm: Arc<Alarm>,
    /// Dropped with the last clone.
    _last: Arc<LastHandle>,
}

/// Join handle of the writer thread; [`WriterThread::join`] waits for its last commit.
pub struct WriterThread(std::thread::JoinHandle<()>);

impl WriterThread {
    /// Waits until the writer has committed everything it received and exited. The
    /// writer exits once every [`StoreHandle`] is dropped.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

impl StoreHandle {
    /// Opens the store and starts the writer thread.
    pub fn start(
        dir: PathBuf,
        agent_id: &str,
        opts: StoreOptions,
        wopts: WriterOptions,
        metrics: Arc<Metrics>,
    ) -> Result<(StoreHandle, WriterThread), StoreError> {
        let store = Store::open(&dir, opts)?;
        let reader = StoreReader::open(&dir, agent_id)?;
        let (tx, rx) = flume::bounded(QUEUE);
        let (snap_tx, snap_rx) = watch::channel(store.snapshot());
        let (status_tx, status_rx) = watch::channel(None);
        let gate = Arc::new(Gate::default());
        let commit_window = wopts.commit_window;
        let writer_gate = gate.clone();
        let rung = Arc::new(AtomicBool::new(false));
        let writer_rung = rung.clone();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(store, rx, snap_tx, status_tx, wopts, writer_gate, writer_rung, metrics))
            .expect("spawning the writer thread");
        let alarm = Arc::new(Alarm { thread: thread.thread().clone(), rung });
        let handle = StoreHandle {
            tx,
            snapshot: snap_rx,
            reader: Arc::new(Mutex::new(reader)),
            status: status_rx,
            gate,
            commit_window,
            _last: Arc::new(LastHandle(alarm.clone())),
            alarm,
        };
        Ok((handle, WriterThread(thread)))
    }

    /// The commit window's view of one MQTT connection (see [`super::window`]): the
    /// listener reports its PUBLISHes, verdicts and silences, and the writer commits early
    /// when every connection with readings pending waits for them.
    pub fn publisher(&self) -> Publisher {
        // Only the alarm: a connection must not keep the writer alive after shutdown.
        let alarm = self.alarm.clone();
        Publisher::new(self.gate.clone(), self.commit_window, Box::new(move || alarm.ring()))
    }

    /// Appends readings atomically; resolves once they are durably committed.
    pub async fn append(&self, readings: Vec<Reading>) -> Result<(), AppendError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Append { readings, origin: None, publish: None, reply }).await?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    /// Queues readings for the next commit and returns the receiver of the verdict, so a
    /// caller can pipeline several appends and await them in order.
    pub async fn submit(
        &self,
        readings: Vec<Reading>,
    ) -> Result<oneshot::Receiver<Result<(), AppendError>>, AppendError> {
        self.submit_publish(readings, None, None).await
    }

    /// Like [`submit`](Self::submit), for the readings of one MQTT PUBLISH: the streams
    /// they create are charged to `origin`'s quota, and for a persistent session
    /// (`publish`) the store records the packet identifier in the same transaction, so a
    /// re-send of a committed one is answered `Ok` without storing anything.
    pub async fn submit_publish(
        &self,
        readings: Vec<Reading>,
        origin: Option<Arc<str>>,
        publish: Option<PublishId>,
    ) -> Result<oneshot::Receiver<Result<(), AppendError>>, AppendError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Append { readings, origin, publish, reply }).await?;
        Ok(rx)
    }

    /// Commits an MQTT session change (see [`SessionOp`]); resolves once durable.
    pub async fn session(&self, op: SessionOp) -> Result<bool, AppendError> {
        self.submit_session(op).await?.await.map_err(|_| AppendError::Closed)?
    }

    /// Queues an MQTT session change for the next commit and returns the receiver of its
    /// answer, so a connection can keep reading while it commits.
    pub async fn submit_session(
        &self,
        op: SessionOp,
    ) -> Result<oneshot::Receiver<Result<bool, AppendError>>, AppendError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Session { op, reply }).await?;
        Ok(rx)
    }

    /// Commits a module's output readings together with its progress (input cursor and
    /// state): both or neither. Resolves once durable.
    /// `urgent` (the module is behind on its input) commits without waiting for the
    /// commit window.
    pub async fn commit_module(
        &self,
        readings: Vec<Reading>,
        progress: ModuleProgress,
        urgent: bool,
    ) -> Result<(), AppendError> {
        self.submit_module(readings, progress, urgent).await?.await.map_err(|_| AppendError::Closed)?
    }

    /// Like [`commit_module`](Self::commit_module), returning the receiver of the verdict
    /// once the commit is queued, so a module can process its next batch while this one
    /// commits. A failed commit does not stop a later one from landing, so a module must
    /// have its verdict before it queues its next commit (the runner keeps one in flight).
    pub async fn submit_module(
        &self,
        readings: Vec<Reading>,
        progress: ModuleProgress,
        urgent: bool,
    ) -> Result<oneshot::Receiver<Result<(), AppendError>>, AppendError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Module { readings, progress, urgent, reply }).await?;
        if urgent {
            self.alarm.ring();
        }
        Ok(rx)
    }

    /// Blocking variant of [`append`](Self::append) for non-async threads.
    pub fn append_blocking(&self, readings: Vec<Reading>) -> Result<(), AppendError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Cmd::Append { readings, origin: None, publish: None, reply }).map_err(|_| AppendError::Closed)?;
        self.ring_if_filling();
        rx.blocking_recv().map_err(|_| AppendError::Closed)?
    }

    /// Records hub acknowledgements; the batches leave the outbox with the next commit.
    pub async fn ack(&self, seqs: Vec<u64>) {
        let _ = self.send(Cmd::Ack(seqs)).await;
    }

    /// Queues a command. Joining the window wakes nobody, unless the queue is half full.
    async fn send(&self, cmd: Cmd) -> Result<(), AppendError> {
        self.tx.send_async(cmd).await.map_err(|_| AppendError::Closed)?;
        self.ring_if_filling();
        Ok(())
    }

    /// A queue half full is worth a commit now: the window would make senders wait.
    fn ring_if_filling(&self) {
        if self.tx.len() * 2 >= QUEUE {
            self.alarm.ring();
        }
    }

    /// Latest snapshot. The writer publishes one after every commit (changed or not),
    /// after a failed commit and after a retention run that changed it, so `changed()` on
    /// the receiver wakes on each commit: module runners wait on it for new input.
    pub fn snapshot(&self) -> watch::Receiver<StoreSnapshot> {
        self.snapshot.clone()
    }

    /// `None` when healthy, else the kind of the last storage error (`disk_full`, …).
    pub fn status(&self) -> Option<&'static str> {
        *self.status.borrow()
    }

    /// Runs `f` with the read-only connection on a blocking thread.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StoreReader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&reader.lock().unwrap_or_else(|e| e.into_inner())))
            .await
            .expect("store reader task panicked")
    }
}

/// Where the writer sends a command's verdict.
type Reply<T> = oneshot::Sender<Result<T, AppendError>>;

#[expect(clippy::too_many_arguments, reason = "the writer thread's whole state, moved in once at spawn")]
fn writer_loop(
    mut store: Store,
    rx: flume::Receiver<Cmd>,
    snap_tx: watch::Sender<StoreSnapshot>,
    status_tx: watch::Sender<Option<&'static str>>,
    wopts: WriterOptions,
    gate: Arc<Gate>,
    rung: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) {
    let WriterOptions { max_per_commit, retention_interval, commit_window } = wopts;
    let mut next_expire = Instant::now() + retention_interval;
    let mut acks: Vec<u64> = Vec::new();
    let mut failures = 0u32;
    let mut closed = false;
    while !closed {
        let deadline = store.linger_deadline().map_or(next_expire, |d| d.min(next_expire));
        let mut appends: Vec<(Vec<Reading>, Reply<()>)> = Vec::new();
        let mut progress: Vec<(usize, ModuleProgress)> = Vec::new();
        let mut publishes: Vec<(usize, PublishId)> = Vec::new();
        let mut origins: Vec<(usize, Arc<str>)> = Vec::new();
        let mut sessions: Vec<(SessionOp, Reply<bool>)> = Vec::new();
        let mut n = 0usize;
        // Set by a command that must not wait for the window (an urgent module commit).
        let mut urgent = false;
        let mut take = |cmd: Cmd, n: &mut usize, acks: &mut Vec<u64>, urgent: &mut bool| match cmd {
            Cmd::Append { readings, origin, publish, reply } => {
                *n += readings.len().max(1);
                if let Some(p) = publish {
                    publishes.push((appends.len(), p));
                }
                if let Some(o) = origin {
                    origins.push((appends.len(), o));
                }
                appends.push((readings, reply));
            }
            Cmd::Session { op, reply } => {
                *n += 1;
                sessions.push((op, reply));
            }
            Cmd::Module { readings, progress: p, urgent: u, reply } => {
                *n += readings.len();
                *urgent |= u;
                progress.push((appends.len(), p));
                appends.push((readings, reply));
            }
            Cmd::Ack(s) => acks.extend(s),
        };
        let mut window_end = None;
        match rx.recv_deadline(deadline) {
            Ok(cmd) => {
                window_end = Some(Instant::now() + commit_window);
                take(cmd, &mut n, &mut acks, &mut urgent);
            }
            Err(flume::RecvTimeoutError::Timeout) => {}
            Err(flume::RecvTimeoutError::Disconnected) => closed = true,
        }
        // Group commit: take everything already queued, then what arrives within the
        // window, up to the per-commit bound.
        if let Some(end) = window_end {
            while n < max_per_commit {
                match rx.try_recv() {
                    Ok(cmd) => {
                        take(cmd, &mut n, &mut acks, &mut urgent);
                        continue;
                    }
                    Err(flume::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                    Err(flume::TryRecvError::Empty) => {}
                }
                // Rung by a connection gone quiet (checked against the gate: connections
                // may have resumed since), a queue filling up (drained above) or the last
                // handle gone (seen above as Disconnected).
                if urgent || (rung.swap(false, Ordering::AcqRel) && gate.all_quiet()) {
                    break;
                }
                let now = Instant::now();
                if now >= end {
                    break;
                }
                std::thread::park_timeout(end - now);
            }
        }

        let now = Instant::now();
        if now >= next_expire {
            next_expire = now + retention_interval;
            match store.expire(crate::now_ns()) {
                Ok(out) => {
                    metrics.record_dropped(&out.dropped);
                    // Counts changed without a commit of readings: publish them too.
                    snap_tx.send_if_modified(|s| {
                        let new = store.snapshot();
                        let changed = *s != new;
                        *s = new;
                        changed
                    });
                }
                Err(e) => tracing::warn!(error = %e, "retention run failed; will retry"),
            }
        }
        if appends.is_empty()
            && sessions.is_empty()
            && acks.is_empty()
            && store.linger_deadline().is_none_or(|d| now < d)
        {
            continue;
        }

        let groups: Vec<&[Reading]> = appends.iter().map(|(r, _)| r.as_slice()).collect();
        let ops: Vec<SessionOp> = sessions.iter().map(|(op, _)| op.clone()).collect();
        let started = Instant::now();
        let write = Write {
            groups: &groups,
            progress: &progress,
            publishes: &publishes,
            sessions: &ops,
            origins: &origins,
            acks: &acks,
        };
        match store.commit(&write, now) {
            Ok(out) => {
                metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                metrics.commits.inc();
                acks.clear();
                if failures > 0 {
                    tracing::info!("store writable again");
                    failures = 0;
                    let _ = status_tx.send(None);
                }
                metrics.record_dropped(&out.dropped);
                metrics.batches_cut.inc_by(out.batches_cut);
                // Publish the new state before replying, so whoever was acknowledged sees it.
                let _ = snap_tx.send(store.snapshot());
                for ((op, reply), answer) in sessions.into_iter().zip(out.sessions) {
                    tracing::debug!(?op, answer, "MQTT session change committed");
                    let _ = reply.send(Ok(answer));
                }
                for (i, ((readings, reply), result)) in appends.into_iter().zip(out.results).enumerate() {
                    match &result {
                        Ok(()) if out.duplicates.contains(&i) => {
                            metrics.sensor_resends_deduplicated.inc();
                        }
                        Ok(()) => {
                            metrics.readings_committed.inc_by(readings.len() as u64);
                        }
                        Err(refusal) => {
                            metrics.refused(refusal.reason(), readings.len() as u64);
                            if let Refusal::StreamQuota { client, .. } = refusal {
                                let label = crate::metrics::ClientLabel { client: client.clone() };
                                metrics.stream_quota_refused.get_or_create(&label).inc();
                            }
                        }
                    }
                    let _ = reply.send(result.map_err(AppendError::from));
                }
            }
            Err(e) => {
                let kind = e.kind();
                failures += 1;
                // ERROR: nothing is lost (nothing here was acknowledged), but new data
                // cannot be accepted until an operator frees space or fixes the disk.
                tracing::error!(error = %e, kind, "store commit failed; readings refused until storage recovers");
                metrics.store_errors.get_or_create(&crate::metrics::KindLabel { kind: kind.into() }).inc();
                let _ = status_tx.send(Some(kind));
                for (readings, reply) in appends {
                    metrics.refused(kind, readings.len() as u64);
                    let _ = reply.send(Err(AppendError::Unavailable(kind)));
                }
                for (_, reply) in sessions {
                    let _ = reply.send(Err(AppendError::Unavailable(kind)));
                }
                // Keep `acks` for the next attempt. Back off so a full disk is not hammered.
                std::thread::sleep(Duration::from_millis(50 * u64::from(failures.min(20))));
                let _ = snap_tx.send(store.snapshot());
            }
        }
    }
    tracing::debug!("store writer stopped");
}
