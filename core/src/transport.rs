//! The client transport: a replica's sync loop over WebSocket, on Ferry's own tokio runtime.
//!
//! [`Replica::connect`] starts one task that drives the sans-I/O [`SyncClient`] over a real
//! connection: it pushes while it pulls, reconnects with exponential backoff and jitter,
//! asks the app's [`TokenProvider`] for a token at every connect (so an expired token is
//! replaced by a fresh one), and reports [`SyncStatus`] to observers. Every replica call it
//! makes is a short local transaction; nothing is held open across network I/O.
//!
//! The runtime is Ferry's own (two worker threads, created on first use), so apps that have
//! no async runtime of their own (Kotlin, Swift, a CLI) can use it, and apps that have one
//! are not disturbed by SQLite work on their executor.
//!
//! ```no_run
//! # fn main() -> ferry_core::Result<()> {
//! use ferry_core::{Replica, Schema, TableDecl};
//! use std::{sync::Arc, time::Duration};
//! let schema = Schema::new(1).table(TableDecl::new("todo").text_key("id").text("title"));
//! let replica = Arc::new(Replica::open("todo.db", &schema)?);
//! let sync = replica.connect("ws://127.0.0.1:7070/sync", Arc::new(|| Ok("<jwt>".to_string())))?;
//! replica.execute("INSERT INTO todo VALUES (?1, 'milk')", &[replica.new_id().into()])?;
//! sync.sync_now_blocking(Duration::from_secs(10))?; // pushed and caught up
//! # Ok(()) }
//! ```

use crate::changeset::Fence;
use crate::error::{Error, Result};
use crate::ids::ChangeId;
use crate::lease;
use crate::log::Verdict;
use crate::observer::{ChangeEvent, ChangeSource, Observer};
use crate::protocol::{
    ClientMsg, CodeKind, ErrorCode, LeaseOutcome, LeaseRequest, MAX_FRAME_BYTES, ServerMsg,
};
use crate::replica::Replica;
use crate::socket::{self, Outbox, Ws};
use crate::status_board::{ObserverList, StatusBoard};
use crate::sync::{Phase, RefusedPush, RemoteChecksum, SnapshotProgress, SyncClient};
use crate::transaction::Transaction;
use futures_util::StreamExt;
use parking_lot::{Condvar, Mutex};
use rand::RngExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Supplies the bearer token for each connection. Called (on a blocking thread) before every
/// connect, so returning a fresh token is how an expired one gets replaced.
pub trait TokenProvider: Send + Sync {
    /// The token to present, or a message explaining why there is none.
    fn token(&self) -> std::result::Result<String, String>;
}

impl<F> TokenProvider for F
where
    F: Fn() -> std::result::Result<String, String> + Send + Sync,
{
    fn token(&self) -> std::result::Result<String, String> {
        self()
    }
}

/// Connection state as observers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Not connected; will retry after a backoff.
    Offline,
    /// Opening a connection.
    Connecting,
    /// Connected and streaming.
    Online,
    /// Paused by the app.
    Paused,
    /// Disconnected for good (the handle was dropped or `disconnect` called).
    Stopped,
}

/// `done` of `total` items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Items finished.
    pub done: u64,
    /// Items known.
    pub total: u64,
}

/// The last error the sync loop met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncError {
    /// The relay's code, when the relay sent one.
    pub code: Option<ErrorCode>,
    /// What happened.
    pub message: String,
}

/// What the sync loop is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStatus {
    /// Connection state.
    pub state: ConnState,
    /// Change sets acknowledged this session, of those pending.
    pub uploading: Progress,
    /// Relay positions applied this session, of those known.
    pub downloading: Progress,
    /// Relay position applied.
    pub cursor: u64,
    /// Relay head as last heard.
    pub head: u64,
    /// Local change sets not yet acknowledged.
    pub pending: u64,
    /// The last error (cleared when a connection comes up).
    pub last_error: Option<SyncError>,
    /// A push refusal that stops uploads until the change set is withdrawn.
    pub refused: Option<RefusedPush>,
    /// Connections opened so far.
    pub connects: u64,
    /// Connection attempts and sessions that ended in failure so far (`last_error` says why
    /// the last one did); [`SyncHandle::try_sync_now`] fails when it grows.
    pub failures: u64,
    /// Keep-alive answers received so far (each carries a fresh relay head).
    pub pongs: u64,
    /// The highest [`SyncHandle::sync_now`] request a relay head has been learnt for: a pong
    /// answering a ping sent after that request was made.
    pub answered: u64,
    /// Change sets the relay refused (compare-and-set conflict, stale lease) and that were
    /// rolled back, since this handle was created.
    pub rolled_back: u64,
    /// Downloads are paused at a change this app's schema cannot hold (a newer app version
    /// wrote it): open the replica with the newer schema to resume. The connection stays up
    /// and uploads go on; [`SyncHandle::sync_now`] fails with [`Error::AppSchemaOutdated`].
    pub schema_outdated: Option<crate::sync::SchemaOutdated>,
    /// Change sets the relay refused for a permanent reason and that wait in quarantine for
    /// the app's decision ([`crate::Replica::quarantined`]); the uploads behind them go on.
    pub quarantined: u64,
    /// The snapshot being received on this connection (see [`crate::snapshot`]): rows and
    /// bytes of the totals the relay announced. All zero when none is sent.
    pub snapshot: SnapshotProgress,
    /// Bytes of change sets acknowledged this session ([`crate::ChangeSet::approx_bytes`]).
    pub uploaded_bytes: u64,
    /// The replica has been completely synced at least once (see `last_synced_at`).
    pub has_synced: bool,
    /// When the replica was last caught up with the relay (ms since the Unix epoch).
    pub last_synced_at: Option<u64>,
    /// Why uploads are failing, while they are: a push the relay refused that stops them
    /// (see `refused`), or a change set this device could not prepare or send. Cleared when
    /// the relay acknowledges a push again.
    pub upload_error: Option<SyncError>,
    /// Why downloads are failing, while they are: changes or a snapshot page this device
    /// could not apply (a full disk, say), or downloads paused at a change a newer app wrote
    /// (see `schema_outdated`). Cleared when a download applies again.
    pub download_error: Option<SyncError>,
}

impl SyncStatus {
    /// How far the upload of this session has come, from 0.0 to 1.0; `None` when nothing was
    /// to be uploaded.
    pub fn upload_fraction(&self) -> Option<f64> {
        fraction(self.uploading.done, self.uploading.total)
    }

    /// How far the download has come, from 0.0 to 1.0: through the snapshot's rows while a
    /// new device receives one, else through the relay positions known this session. `None`
    /// when nothing was to be downloaded.
    pub fn download_fraction(&self) -> Option<f64> {
        let snap = &self.snapshot;
        if snap.total_rows > 0 && snap.rows < snap.total_rows {
            return fraction(snap.rows, snap.total_rows);
        }
        fraction(self.downloading.done, self.downloading.total)
    }
}

fn fraction(done: u64, total: u64) -> Option<f64> {
    (total > 0).then(|| (done.min(total) as f64) / (total as f64))
}

impl SyncStatus {
    fn initial() -> Self {
        SyncStatus {
            state: ConnState::Connecting,
            uploading: Progress::default(),
            downloading: Progress::default(),
            cursor: 0,
            head: 0,
            pending: 0,
            last_error: None,
            refused: None,
            connects: 0,
            failures: 0,
            pongs: 0,
            answered: 0,
            rolled_back: 0,
            quarantined: 0,
            schema_outdated: None,
            snapshot: SnapshotProgress::default(),
            uploaded_bytes: 0,
            has_synced: false,
            last_synced_at: None,
            upload_error: None,
            download_error: None,
        }
    }
}

/// Receives status updates (on Ferry's sync thread; keep it short).
pub trait StatusObserver: Send + Sync {
    /// Called whenever the status changes.
    fn on_status(&self, status: &SyncStatus);
}

impl<F: Fn(&SyncStatus) + Send + Sync> StatusObserver for F {
    fn on_status(&self, status: &SyncStatus) {
        self(status)
    }
}

/// Tuning of the sync loop.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Keep-alive interval; a connection silent for three intervals is dropped.
    pub ping_interval: Duration,
    /// Limit for opening a connection (TCP + WebSocket handshake + welcome).
    pub connect_timeout: Duration,
    /// Change sets per push frame.
    pub push_batch_sets: usize,
    /// Approximate bytes per push frame.
    pub push_batch_bytes: usize,
    /// Largest frame accepted from the relay.
    pub max_frame_bytes: usize,
    /// How often local writes made by other connections are looked for while online.
    pub foreign_poll: Duration,
    /// Most change sets pushed and not yet acknowledged.
    pub push_window_sets: usize,
    /// Most bytes of change sets pushed and not yet acknowledged (the relay may announce
    /// less). With the session's separate writer this bounds what a backlog puts on the
    /// wire ahead of the relay's answers, so no backlog can stall a connection.
    pub push_window_bytes: usize,
    /// TCP send and receive buffer size for the connection (`None`: the kernel's
    /// autotuning). Small buffers save memory on constrained devices; flow control does not
    /// depend on them.
    pub socket_buffer_bytes: Option<usize>,
    /// Allows `ws://` (unencrypted) to a host other than loopback. Off by default: anyone on
    /// the path could read the token and the data, and change what the device receives.
    /// Turn it on only for a trusted network (an emulator's host bridge, a lab).
    pub allow_insecure: bool,
    /// What the device trusts over `wss://` beyond the operating system's roots: the app's
    /// own CAs and public-key pins (see [`crate::tls`]).
    pub trust: crate::tls::Trust,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            ping_interval: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            push_batch_sets: 256,
            push_batch_bytes: 1 << 20,
            max_frame_bytes: MAX_FRAME_BYTES,
            foreign_poll: Duration::from_secs(1),
            push_window_sets: 1024,
            push_window_bytes: crate::sync::DEFAULT_PUSH_WINDOW_BYTES,
            socket_buffer_bytes: None,
            allow_insecure: false,
            trust: crate::tls::Trust::default(),
        }
    }
}

/// Checks a relay URL: `wss://`, or `ws://` to a loopback host (or to any host when the app
/// opted in with [`SyncOptions::allow_insecure`]).
fn check_relay_url(url: &str, allow_insecure: bool) -> Result<()> {
    let parsed = url.parse::<tokio_tungstenite::tungstenite::http::Uri>();
    let uri = match parsed {
        Ok(u) if matches!(u.scheme_str(), Some("ws") | Some("wss")) => u,
        _ => {
            return Err(Error::InvalidInput(format!(
                "relay url `{url}` must start with ws:// or wss://"
            )));
        }
    };
    if uri.scheme_str() == Some("wss") || allow_insecure {
        return Ok(());
    }
    let host = uri.host().unwrap_or("");
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "relay url `{url}` is unencrypted (ws://) to a host other than loopback: use wss://, or set SyncOptions::allow_insecure for a trusted network"
        )))
    }
}

/// The outcome of [`SyncHandle::verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verification {
    /// Relay position both digests describe.
    pub position: u64,
    /// The relay's digest of what this replica may read.
    pub relay: [u8; 32],
    /// This replica's digest.
    pub local: [u8; 32],
    /// Rows the relay summed.
    pub relay_rows: u64,
    /// Rows this replica summed.
    pub local_rows: u64,
}

impl Verification {
    /// True when the replica holds exactly what the relay says it should.
    pub fn matches(&self) -> bool {
        self.relay == self.local && self.relay_rows == self.local_rows
    }
}

enum Command {
    Pause,
    Resume,
    Wake,
    /// Connect again at once (the subscriptions changed).
    Reconnect,
    Checksum(oneshot::Sender<RemoteChecksum>),
    Lease(LeaseRequest, oneshot::Sender<LeaseOutcome>),
    Stop,
}

/// A lease this replica holds: a named lock granted by the relay for a time-to-live on the
/// relay's clock, with the fencing token of the grant (see [`crate::lease`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Lease name.
    pub name: String,
    /// Fencing token of this grant.
    pub token: u64,
    /// Time to live granted.
    pub ttl: Duration,
    /// When the answer arrived (the grant expires at most `ttl` after it, on the relay).
    pub granted_at: Instant,
}

impl Lease {
    /// The fence to guard a transaction with ([`crate::Transaction::guard`]).
    pub fn fence(&self) -> Fence {
        Fence {
            lease: self.name.clone(),
            token: self.token,
        }
    }

    /// A local estimate of the time left. Only the relay's clock decides expiry: a write
    /// guarded by an expired grant is refused there whatever this says.
    pub fn remaining(&self) -> Duration {
        self.ttl.saturating_sub(self.granted_at.elapsed())
    }
}

/// Ferry's runtime for sync loops.
pub fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-sync")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| Error::Transport(format!("cannot start Ferry's runtime: {e}")))
}

/// A running sync loop. Dropping it disconnects.
pub struct SyncHandle {
    replica: Arc<Replica>,
    cmd: mpsc::UnboundedSender<Command>,
    /// `sync_now` requests made so far (see [`SyncStatus::answered`]).
    requests: Arc<AtomicU64>,
    /// The session's status for waiting on it ([`SyncHandle::sync_now`] and friends).
    status: watch::Receiver<SyncStatus>,
    /// The session's status observers ([`SyncHandle::observe`]).
    board: Arc<StatusBoard>,
    finished: Arc<Finished>,
}

/// How long [`SyncHandle::disconnect`] waits for the sync task to end.
const DISCONNECT_WAIT: Duration = Duration::from_secs(3);

/// Set once the sync task has ended and dropped what it held — the app's token provider and
/// status listeners, which are foreign objects in the bindings. `disconnect` waits for it, so
/// those objects are released while the app is still running: a Python interpreter that is
/// shutting down aborts the process when another thread releases one of its objects.
#[derive(Default)]
struct Finished {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Finished {
    fn wait(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut done = self.done.lock();
        while !*done {
            if self.cv.wait_until(&mut done, deadline).timed_out() {
                tracing::warn!(?limit, "the sync task did not end in time after disconnect");
                return;
            }
        }
    }
}

/// Marks [`Finished`] when dropped, after everything the task owned.
struct FinishOnDrop(Arc<Finished>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        *self.0.done.lock() = true;
        self.0.cv.notify_all();
    }
}

/// Cancels a status subscription when dropped.
#[must_use = "the subscription ends when this handle is dropped"]
pub struct StatusSubscription {
    observers: std::sync::Weak<Mutex<ObserverList>>,
    id: u64,
}

impl StatusSubscription {
    pub(crate) fn new(observers: std::sync::Weak<Mutex<ObserverList>>, id: u64) -> Self {
        StatusSubscription { observers, id }
    }
}

impl Drop for StatusSubscription {
    fn drop(&mut self) {
        if let Some(o) = self.observers.upgrade() {
            o.lock().retain(|(id, _)| *id != self.id);
        }
    }
}

impl std::fmt::Debug for SyncHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncHandle")
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl Replica {
    /// The replica's sync status, whichever session produces it: the last status any of its
    /// sessions published (a session that ended says `Stopped`), or, before any, one read
    /// from the file (`Stopped`, cursor, pending writes, `has_synced`, `last_synced_at`).
    /// With sessions running side by side, the latest published wins.
    pub fn sync_status(&self) -> Result<SyncStatus> {
        match self.board.last() {
            Some(s) => Ok(s),
            None => self.resting_status(ConnState::Stopped),
        }
    }

    /// Observes [`Replica::sync_status`] across sessions (see `status_board`): the observer
    /// gets the current status at once and every change of any session of this replica
    /// after, until the subscription is dropped.
    pub fn observe_status(&self, observer: Arc<dyn StatusObserver>) -> Result<StatusSubscription> {
        self.board
            .observe(observer, || self.resting_status(ConnState::Stopped))
    }

    /// A status as the file tells it, in `state`.
    fn resting_status(&self, state: ConnState) -> Result<SyncStatus> {
        let mut s = SyncStatus::initial();
        s.state = state;
        s.cursor = self.cursor()?;
        s.pending = self.pending_count()?;
        s.last_synced_at = self.last_synced_at()?;
        s.has_synced = s.last_synced_at.is_some();
        Ok(s)
    }

    /// After [`Replica::clear`]: the board starts over from the new, empty file.
    pub(crate) fn restart_status(&self) -> Result<()> {
        let now = self.resting_status(ConnState::Stopped)?;
        self.board.restart(&now);
        Ok(())
    }

    /// Starts syncing with the relay at `url` (`ws://` or `wss://`) with default options.
    pub fn connect(
        self: &Arc<Self>,
        url: &str,
        tokens: Arc<dyn TokenProvider>,
    ) -> Result<SyncHandle> {
        self.connect_with(url, tokens, SyncOptions::default())
    }

    /// Starts syncing with explicit options.
    pub fn connect_with(
        self: &Arc<Self>,
        url: &str,
        tokens: Arc<dyn TokenProvider>,
        opts: SyncOptions,
    ) -> Result<SyncHandle> {
        check_relay_url(url, opts.allow_insecure)?;
        let tls = opts.trust.client_config()?;
        let rt = runtime()?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let initial = self.resting_status(ConnState::Connecting)?;
        self.board.publish(&initial);
        let board = Arc::new(StatusBoard::default());
        board.publish(&initial);
        let (status_tx, status_rx) = watch::channel(initial);
        let wake = Arc::new(tokio::sync::Notify::new());
        let requests = Arc::new(AtomicU64::new(0));
        let sub = self.subscribe(Arc::new(LocalWrites(Arc::clone(&wake))));
        let lp = SyncTask {
            _live: LiveSession::new(&self.live_sessions),
            replica: Arc::clone(self),
            url: url.to_owned(),
            tls,
            tokens,
            opts,
            cmd: cmd_rx,
            status: status_tx,
            board: Arc::clone(&board),
            wake,
            requests: Arc::clone(&requests),
            paused: false,
            checksum_waiters: Vec::new(),
            lease_waiters: Vec::new(),
            synced_cursor: AtomicU64::new(u64::MAX),
        };
        let finished = Arc::new(Finished::default());
        let signal = FinishOnDrop(Arc::clone(&finished));
        rt.spawn(async move {
            let _signal = signal; // dropped last, after the task's own state
            let _sub = sub;
            lp.run().await;
        });
        Ok(SyncHandle {
            replica: Arc::clone(self),
            cmd: cmd_tx,
            requests,
            status: status_rx,
            board,
            finished,
        })
    }
}

/// What [`SyncHandle::try_sync_now`] reports for a failed connection, in the category of its
/// cause: a refused token as the relay's refusal, an unreachable or unavailable relay as a
/// transport error, a protocol mismatch as one. `None` for failures the session recovers from
/// by itself at once (a clock to re-stamp, an identity to rotate) and for push refusals,
/// which are reported by `refused`, the quarantine and rollbacks instead.
fn failed_fast(err: Option<&SyncError>) -> Option<Error> {
    let Some(err) = err else {
        return Some(Error::Transport("the connection failed".into()));
    };
    let message = err.message.clone();
    let Some(code) = err.code else {
        return Some(Error::Transport(message));
    };
    match code.kind() {
        CodeKind::Auth => Some(Error::Refused { code, message }),
        CodeKind::Unavailable => Some(Error::Transport(format!("{}: {message}", code.as_str()))),
        CodeKind::Incompatible => Some(Error::Protocol(format!("{}: {message}", code.as_str()))),
        CodeKind::SelfHealing | CodeKind::Lost | CodeKind::Invalid => None,
    }
}

/// Frames decoded ahead of the session loop.
const DECODED_AHEAD: usize = 2;

/// What the reader hands the session loop.
enum Incoming {
    Msg(ServerMsg),
    Undecodable(Error),
    Closed,
    Lost(String),
}

/// Reads and decodes the relay's frames on its own task, a couple of frames ahead of the
/// session loop: while the loop applies one snapshot page or batch of change sets, the next
/// is decoded on the other core. The channel is bounded, so a loop that falls behind stops
/// the reading and the relay's sends wait (flow control stays with the socket); the loop
/// never waits on the reader while it has something to do, and the writer is separate.
struct Reader {
    rx: mpsc::Receiver<Incoming>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    fn start(mut ws: futures_util::stream::SplitStream<Ws>, max_frame_bytes: usize) -> Reader {
        let (tx, rx) = mpsc::channel(DECODED_AHEAD);
        let task = tokio::spawn(async move {
            loop {
                let item = match ws.next().await {
                    None | Some(Ok(Message::Close(_))) => Incoming::Closed,
                    Some(Err(e)) => Incoming::Lost(e.to_string()),
                    Some(Ok(Message::Binary(b))) => {
                        match ServerMsg::decode_limited(&b, max_frame_bytes) {
                            Ok(m) => Incoming::Msg(m),
                            Err(e) => Incoming::Undecodable(e),
                        }
                    }
                    Some(Ok(_)) => continue,
                };
                let last = !matches!(item, Incoming::Msg(_));
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Reader { rx, task }
    }

    async fn next(&mut self) -> Incoming {
        self.rx.recv().await.unwrap_or(Incoming::Closed)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct LocalWrites(Arc<tokio::sync::Notify>);

impl Observer for LocalWrites {
    fn on_change(&self, event: &ChangeEvent) {
        if event.source != ChangeSource::Remote {
            self.0.notify_one();
        }
    }
}

impl SyncHandle {
    /// The current status.
    pub fn status(&self) -> SyncStatus {
        self.status.borrow().clone()
    }

    /// Calls `observer` with the current status now and on every change until the returned
    /// handle is dropped.
    pub fn observe(&self, observer: Arc<dyn StatusObserver>) -> StatusSubscription {
        // Registered and given the current status as one step against publishing (see
        // `status_board`): otherwise a change published between the two is never seen (the
        // observer would wait for the next one, forever when the loop is paused). The board
        // holds the session's status from the start; the watch channel's is the same.
        self.board
            .observe_published(observer, || self.status.borrow().clone())
    }

    /// Stops syncing until [`SyncHandle::resume`] (closes the connection).
    pub fn pause(&self) {
        let _ = self.cmd.send(Command::Pause);
    }

    /// Resumes after [`SyncHandle::pause`], connecting at once.
    pub fn resume(&self) {
        let _ = self.cmd.send(Command::Resume);
    }

    /// Disconnects for good (also done on drop). Outside an async context it waits (a few
    /// seconds at most) until the sync task has ended and released the token provider and
    /// listeners it held.
    pub fn disconnect(&self) {
        let _ = self.cmd.send(Command::Stop);
        if tokio::runtime::Handle::try_current().is_err() {
            self.finished.wait(DISCONNECT_WAIT);
        }
    }

    /// Syncs `scope` too (see [`Replica::subscribe_scope`]): reconnects at once, and the relay
    /// back-fills the scope by a snapshot. [`SyncHandle::wait_for_first_sync`] waits for it.
    pub fn subscribe(&self, scope: &str) -> Result<()> {
        self.replica.subscribe_scope(scope)?;
        let _ = self.cmd.send(Command::Reconnect);
        Ok(())
    }

    /// Stops syncing `scope` (see [`Replica::unsubscribe_scope`]): reconnects at once; its
    /// rows are evicted once this replica's pending writes are pushed.
    pub fn unsubscribe(&self, scope: &str) -> Result<()> {
        self.replica.unsubscribe_scope(scope)?;
        let _ = self.cmd.send(Command::Reconnect);
        Ok(())
    }

    /// Replaces the subscriptions (`None`: every scope the token may read) and reconnects.
    pub fn set_subscriptions(&self, subscriptions: Option<Vec<String>>) -> Result<()> {
        self.replica.set_subscriptions(subscriptions)?;
        let _ = self.cmd.send(Command::Reconnect);
        Ok(())
    }

    /// True once `scope`'s rows are complete on this replica (see [`Replica::holds_scope`]).
    pub fn has_synced(&self, scope: &str) -> Result<bool> {
        self.replica.holds_scope(scope)
    }

    /// Waits until [`SyncHandle::has_synced`]`(scope)`; fails with [`Error::Transport`]
    /// after `timeout` or when the sync loop stops first.
    pub async fn wait_for_first_sync(&self, scope: &str, timeout: Duration) -> Result<()> {
        let mut rx = self.status.clone();
        let wait = async {
            loop {
                {
                    let state = rx.borrow_and_update().state;
                    if self.replica.holds_scope(scope)? {
                        return Ok(());
                    }
                    if state == ConnState::Stopped {
                        return Err(Error::Transport(format!(
                            "the sync loop stopped before scope `{scope}` synced"
                        )));
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(Error::Transport(format!(
                        "the sync loop ended before scope `{scope}` synced"
                    )));
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            Error::Transport(format!("scope `{scope}` did not sync within {timeout:?}"))
        })?
    }

    /// Blocking [`SyncHandle::wait_for_first_sync`] for callers outside an async context.
    pub fn wait_for_first_sync_blocking(&self, scope: &str, timeout: Duration) -> Result<()> {
        runtime()?.block_on(self.wait_for_first_sync(scope, timeout))
    }

    /// Completes when nothing is pending and the cursor has reached the relay's head as of
    /// this call (a ping's answer), or fails when a push was refused or the loop stopped.
    /// While offline it waits for the connection: wrap it in a timeout if that matters.
    pub async fn sync_now(&self) -> Result<()> {
        self.sync_until(false).await
    }

    /// [`SyncHandle::sync_now`] that fails fast, for apps: at the first connection attempt (or
    /// session) that fails after the call, with [`Error::Refused`] carrying the relay's code
    /// when the relay refused (`unauthorized` for a bad or expired token, `forbidden`, ...) and
    /// [`Error::Transport`] when the relay could not be reached. The session keeps retrying
    /// in the background; call again to wait for the next attempt.
    pub async fn try_sync_now(&self) -> Result<()> {
        self.sync_until(true).await
    }

    async fn sync_until(&self, fail_fast: bool) -> Result<()> {
        let mut rx = self.status.clone();
        let failures = rx.borrow().failures;
        // Every ping the loop sends is tagged with the requests made before it was sent; the
        // loop answers Wake with a ping (or sends one as soon as a connection is up), so a
        // pong answering request `me` carries a head learnt after this call. A welcome's
        // head does not count: the hello may have left before this call.
        let me = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.cmd.send(Command::Wake);
        loop {
            {
                let s = rx.borrow_and_update();
                if s.state == ConnState::Stopped {
                    return Err(Error::Transport("sync stopped".into()));
                }
                if let Some(r) = &s.refused {
                    return Err(Error::Refused {
                        code: r.code,
                        message: r.message.clone(),
                    });
                }
                if let Some(o) = &s.schema_outdated {
                    return Err(Error::AppSchemaOutdated {
                        table: o.table.clone(),
                        column: o.column.clone(),
                    });
                }
                if fail_fast
                    && s.failures > failures
                    && let Some(e) = failed_fast(s.last_error.as_ref())
                {
                    return Err(e);
                }
                let fresh = s.answered >= me;
                if fresh && s.state == ConnState::Online && s.pending == 0 && s.cursor >= s.head {
                    return Ok(());
                }
            }
            if rx.changed().await.is_err() {
                return Err(Error::Transport("sync stopped".into()));
            }
        }
    }

    /// [`SyncHandle::sync_now`] for callers without an async runtime.
    pub fn sync_now_blocking(&self, timeout: Duration) -> Result<()> {
        let rt = runtime()?;
        rt.block_on(async {
            tokio::time::timeout(timeout, self.sync_now())
                .await
                .map_err(|_| Error::Transport(format!("not synced within {timeout:?}")))?
        })
    }

    /// Syncs, then compares this replica's checksum with the relay's for everything this
    /// connection may read. Retries a few times when new changes keep arriving.
    pub async fn verify(&self, replica: &Replica) -> Result<Verification> {
        let mut last = None;
        for _ in 0..5 {
            self.sync_now().await?;
            let (tx, rx) = oneshot::channel();
            let _ = self.cmd.send(Command::Checksum(tx));
            let remote = rx
                .await
                .map_err(|_| Error::Transport("connection closed before the checksum".into()))?;
            let local = replica.checksum()?;
            if replica.cursor()? == remote.position && replica.pending_count()? == 0 {
                return Ok(Verification {
                    position: remote.position,
                    relay: remote.digest,
                    local: local.digest,
                    relay_rows: remote.rows,
                    local_rows: local.rows,
                });
            }
            last = Some(remote.position);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::Transport(format!(
            "could not compare checksums: the relay's state (position {last:?}) kept moving"
        )))
    }

    /// Commits `tx` and waits for the relay's verdict on its change set: the relay position
    /// it was sequenced at, or [`Error::Rejected`] once it was refused and rolled back. Waits
    /// while offline (wrap it in a timeout if that matters).
    pub async fn commit_checked(&self, tx: &mut Transaction) -> Result<u64> {
        let id = tx.commit_change()?.ok_or_else(|| {
            Error::InvalidInput(
                "the transaction wrote nothing to synced tables: there is no verdict to wait for"
                    .into(),
            )
        })?;
        self.verdict(id).await
    }

    /// Waits for the relay's verdict on this replica's change set `id` (see
    /// [`SyncHandle::commit_checked`]).
    pub async fn verdict(&self, id: ChangeId) -> Result<u64> {
        let mut rx = self.status.clone();
        let _ = self.cmd.send(Command::Wake);
        loop {
            match self.replica.verdict(&id)? {
                Verdict::Accepted(seq) => return Ok(seq),
                Verdict::Rejected { code, reason } => {
                    return Err(Error::Rejected {
                        code,
                        message: reason,
                    });
                }
                Verdict::Pending => {}
            }
            if rx.borrow_and_update().state == ConnState::Stopped {
                return Err(Error::Transport("sync stopped".into()));
            }
            // Acks and rollbacks change the status; the timer covers a verdict that changed
            // nothing an observer sees.
            tokio::select! {
                r = rx.changed() => if r.is_err() {
                    return Err(Error::Transport("sync stopped".into()));
                },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// [`SyncHandle::commit_checked`] for callers without an async runtime.
    pub fn commit_checked_blocking(&self, tx: &mut Transaction, timeout: Duration) -> Result<u64> {
        let rt = runtime()?;
        rt.block_on(async {
            tokio::time::timeout(timeout, self.commit_checked(tx))
                .await
                .map_err(|_| Error::Transport(format!("no verdict within {timeout:?}")))?
        })
    }

    async fn lease_request(&self, request: LeaseRequest) -> Result<LeaseOutcome> {
        lease::validate(&request)?;
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::Lease(request, tx))
            .map_err(|_| Error::Transport("sync stopped".into()))?;
        rx.await.map_err(|_| {
            Error::Transport(
                "the connection closed before the relay answered the lease request".into(),
            )
        })
    }

    /// Acquires the lease `name` for `ttl` (at most 24 h). Fails with [`Error::LeaseBusy`]
    /// while another replica holds it, with [`Error::Transport`] when not connected.
    pub async fn acquire_lease(&self, name: &str, ttl: Duration) -> Result<Lease> {
        let ttl_ms = ttl.as_millis().min(u128::from(u64::MAX)) as u64;
        let outcome = self
            .lease_request(LeaseRequest::Acquire {
                name: name.to_owned(),
                ttl_ms,
            })
            .await?;
        granted(outcome, name, 0)
    }

    /// Extends a grant by `ttl` from now (same token). Fails with [`Error::LeaseLost`] when
    /// it expired or was superseded.
    pub async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let outcome = self
            .lease_request(LeaseRequest::Renew {
                name: lease.name.clone(),
                token: lease.token,
                ttl_ms: ttl.as_millis().min(u128::from(u64::MAX)) as u64,
            })
            .await?;
        granted(outcome, &lease.name, lease.token)
    }

    /// Gives a grant up, so another replica can acquire the lease at once.
    pub async fn release_lease(&self, lease: &Lease) -> Result<()> {
        match self
            .lease_request(LeaseRequest::Release {
                name: lease.name.clone(),
                token: lease.token,
            })
            .await?
        {
            LeaseOutcome::Released { .. } => Ok(()),
            f @ LeaseOutcome::Forbidden { .. } => granted(f, &lease.name, lease.token).map(|_| ()),
            _ => Err(Error::LeaseLost {
                name: lease.name.clone(),
                token: lease.token,
            }),
        }
    }

    /// [`SyncHandle::verify`] for callers without an async runtime.
    pub fn verify_blocking(&self, replica: &Replica, timeout: Duration) -> Result<Verification> {
        let rt = runtime()?;
        rt.block_on(async {
            tokio::time::timeout(timeout, self.verify(replica))
                .await
                .map_err(|_| Error::Transport(format!("not verified within {timeout:?}")))?
        })
    }
}

fn granted(outcome: LeaseOutcome, name: &str, token: u64) -> Result<Lease> {
    match outcome {
        LeaseOutcome::Granted {
            name,
            token,
            ttl_ms,
        } => Ok(Lease {
            name,
            token,
            ttl: Duration::from_millis(ttl_ms),
            granted_at: Instant::now(),
        }),
        LeaseOutcome::Busy {
            name,
            retry_after_ms,
        } => Err(Error::LeaseBusy {
            name,
            retry_after_ms,
        }),
        LeaseOutcome::Lost { .. } | LeaseOutcome::Released { .. } => Err(Error::LeaseLost {
            name: name.to_owned(),
            token,
        }),
        LeaseOutcome::Forbidden { name } => Err(Error::Refused {
            code: ErrorCode::Forbidden,
            message: format!(
                "this token may not take lease `{name}`: it needs a write grant covering that name"
            ),
        }),
    }
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        self.disconnect();
    }
}

/// Counts a running sync task on its replica while it lives (`Replica::clear` needs none).
struct LiveSession(Arc<std::sync::atomic::AtomicUsize>);

impl LiveSession {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> LiveSession {
        count.fetch_add(1, Ordering::AcqRel);
        LiveSession(Arc::clone(count))
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct SyncTask {
    _live: LiveSession,
    replica: Arc<Replica>,
    url: String,
    tokens: Arc<dyn TokenProvider>,
    opts: SyncOptions,
    /// TLS configuration built from `opts.trust` (once: it reads the OS trust store).
    tls: Arc<rustls::ClientConfig>,
    cmd: mpsc::UnboundedReceiver<Command>,
    status: watch::Sender<SyncStatus>,
    /// The session's status observers (shared with the handle).
    board: Arc<StatusBoard>,
    wake: Arc<tokio::sync::Notify>,
    /// `sync_now` requests made so far, shared with the handle.
    requests: Arc<AtomicU64>,
    paused: bool,
    checksum_waiters: Vec<(u64, oneshot::Sender<RemoteChecksum>)>,
    lease_waiters: Vec<(u64, oneshot::Sender<LeaseOutcome>)>,
    /// The cursor the last complete sync was recorded at (`u64::MAX`: none this run).
    synced_cursor: AtomicU64,
}

/// Why a session ended.
enum SessionEnd {
    /// Stop for good.
    Stop,
    /// Paused by the app.
    Paused,
    /// Connect again at once (identity rotated, or the app asked).
    Now,
    /// Failed: back off, then retry.
    Failed(SyncError),
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

impl SyncTask {
    /// Sends a keep-alive ping, remembering which `sync_now` requests its pong answers.
    fn ping(
        &self,
        out: &Outbox,
        nonce: &mut u64,
        inflight: &mut VecDeque<(u64, u64)>,
    ) -> std::result::Result<(), SyncError> {
        *nonce += 1;
        inflight.push_back((*nonce, self.requests.load(Ordering::SeqCst)));
        send(out, &ClientMsg::Ping { nonce: *nonce })
    }

    /// Changes the status with `f` and, if that changed it, tells the session's waiters and
    /// observers, then the replica's.
    fn publish(&self, f: impl FnOnce(&mut SyncStatus)) {
        let mut changed = None;
        self.status.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            if *s != before {
                changed = Some(s.clone());
            }
            changed.is_some()
        });
        if let Some(s) = changed {
            self.board.publish(&s);
            self.replica.board.publish(&s);
        }
    }

    async fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            if self.paused {
                self.publish(|s| s.state = ConnState::Paused);
                match self.cmd.recv().await {
                    None | Some(Command::Stop) => break,
                    Some(Command::Resume) => self.paused = false,
                    Some(Command::Checksum(_))
                    | Some(Command::Lease(..))
                    | Some(Command::Pause)
                    | Some(Command::Reconnect)
                    | Some(Command::Wake) => {}
                }
                continue;
            }
            self.publish(|s| s.state = ConnState::Connecting);
            let end = self.session().await;
            self.checksum_waiters.clear();
            self.lease_waiters.clear();
            match end {
                SessionEnd::Stop => break,
                SessionEnd::Paused => {
                    self.paused = true;
                    failures = 0;
                }
                SessionEnd::Now => failures = 0,
                SessionEnd::Failed(err) => {
                    failures = failures.saturating_add(1);
                    tracing::info!(error = %err.message, failures, "sync connection failed");
                    self.publish(|s| {
                        s.state = ConnState::Offline;
                        s.last_error = Some(err);
                        s.failures += 1;
                    });
                    let delay = backoff(&self.opts, failures);
                    let sleep = tokio::time::sleep(delay);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            c = self.cmd.recv() => match c {
                                None | Some(Command::Stop) => {
                                    self.publish(|s| s.state = ConnState::Stopped);
                                    return;
                                }
                                Some(Command::Pause) => { self.paused = true; break; }
                                Some(Command::Resume) | Some(Command::Wake) | Some(Command::Reconnect) => break,
                                Some(Command::Checksum(_)) | Some(Command::Lease(..)) => {}
                            }
                        }
                    }
                }
            }
        }
        self.publish(|s| s.state = ConnState::Stopped);
    }

    async fn open(&self, token: &str) -> std::result::Result<Ws, SyncError> {
        let cfg = WebSocketConfig::default()
            .max_message_size(Some(self.opts.max_frame_bytes))
            .max_frame_size(Some(self.opts.max_frame_bytes));
        tokio::time::timeout(
            self.opts.connect_timeout,
            socket::open(
                &self.url,
                cfg,
                self.opts.socket_buffer_bytes,
                token,
                Arc::clone(&self.tls),
            ),
        )
        .await
        .map_err(|_| transport_err(format!("connecting to {} timed out", self.url)))?
        .map_err(|e| transport_err(e.to_string()))
    }

    async fn session(&mut self) -> SessionEnd {
        let tokens = Arc::clone(&self.tokens);
        let token = match tokio::task::spawn_blocking(move || tokens.token()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return SessionEnd::Failed(transport_err(format!("token provider failed: {e}")));
            }
            Err(e) => {
                return SessionEnd::Failed(transport_err(format!("token provider panicked: {e}")));
            }
        };
        let (mut out, ws) = match self.open(&token).await {
            Ok(ws) => Outbox::start(ws),
            Err(e) => return SessionEnd::Failed(e),
        };
        let mut frames = Reader::start(ws, self.opts.max_frame_bytes);
        let mut client = SyncClient::new()
            .with_batch(self.opts.push_batch_sets, self.opts.push_batch_bytes)
            .with_window(self.opts.push_window_sets, self.opts.push_window_bytes);
        let replica = Arc::clone(&self.replica);
        let hello = match blocking(|| client.start(&*replica, &token)) {
            Ok(h) => h,
            Err(e) => return SessionEnd::Failed(local_err(&e)),
        };
        if let Err(e) = send(&out, &hello) {
            return SessionEnd::Failed(e);
        }
        let start_cursor = self.replica.cursor().unwrap_or(0);
        let mut acked_this_session = 0u64;
        let mut ping = tokio::time::interval(self.opts.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut poll = tokio::time::interval(self.opts.foreign_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut nonce = 0u64;
        // Pings in flight: (nonce, sync_now requests made before it was sent).
        let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
        let welcome_deadline = Instant::now() + self.opts.connect_timeout;
        loop {
            if client.phase() == Phase::Handshake && Instant::now() > welcome_deadline {
                return SessionEnd::Failed(transport_err(
                    "no welcome from the relay in time".into(),
                ));
            }
            tokio::select! {
                e = out.stopped() => return SessionEnd::Failed(transport_err(e.to_string())),
                frame = frames.next() => {
                    let msg = match frame {
                        Incoming::Msg(m) => m,
                        Incoming::Undecodable(e) => return SessionEnd::Failed(local_err(&e)),
                        Incoming::Closed => return SessionEnd::Failed(transport_err("the relay closed the connection".into())),
                        Incoming::Lost(e) => return SessionEnd::Failed(transport_err(format!("connection lost: {e}"))),
                    };
                    last_heard = Instant::now();
                    // An id the relay will not take (reused, or another user's) is the
                    // client's to replace: it takes a new one and connects again at once.
                    if let ServerMsg::Error { code, message } = &msg
                        && !matches!(code, ErrorCode::OriginReused | ErrorCode::IdentityMismatch)
                    {
                        out.close().await;
                        let err = SyncError { code: Some(*code), message: message.clone() };
                        if client.in_flight_bytes() > 0 {
                            // The relay gave up while pushes waited for its answer (a store
                            // that is full or read-only refuses them so): uploads are what
                            // failed. Cleared when pushes are acknowledged again.
                            self.publish(|s| s.upload_error = Some(err.clone()));
                        }
                        return SessionEnd::Failed(err);
                    }
                    let was_handshake = client.phase() == Phase::Handshake;
                    let acks = match &msg { ServerMsg::Acks { acks } => acks.len() as u64, _ => 0 };
                    let pong = match &msg {
                        ServerMsg::Pong { nonce, .. } => Some(*nonce),
                        _ => None,
                    };
                    let download = matches!(msg, ServerMsg::Changes { .. } | ServerMsg::Snapshot { .. });
                    let upload = matches!(msg, ServerMsg::Acks { .. } | ServerMsg::Refused { .. });
                    let step = match blocking(|| client.handle(&*replica, msg)) {
                        Ok(s) => s,
                        Err(e) => {
                            out.close().await;
                            let err = local_err(&e);
                            self.publish(|s| {
                                if download {
                                    s.download_error = Some(err.clone());
                                } else if upload {
                                    s.upload_error = Some(err.clone());
                                }
                            });
                            return SessionEnd::Failed(err);
                        }
                    };
                    if download && step.applied > 0 {
                        self.publish(|s| s.download_error = None);
                    }
                    acked_this_session += acks;
                    if step.reconnect {
                        out.close().await;
                        return SessionEnd::Now;
                    }
                    if let Some(c) = step.checksum
                        && let Some(i) = self.checksum_waiters.iter().position(|(n, _)| *n == c.nonce)
                    {
                        let (_, tx) = self.checksum_waiters.swap_remove(i);
                        let _ = tx.send(c);
                    }
                    if let Some((n, outcome)) = step.lease
                        && let Some(i) = self.lease_waiters.iter().position(|(w, _)| *w == n)
                    {
                        let (_, tx) = self.lease_waiters.swap_remove(i);
                        let _ = tx.send(outcome);
                    }
                    if !step.withdrawn.is_empty() {
                        let n = step.withdrawn.len() as u64;
                        self.publish(|s| s.rolled_back += n);
                    }
                    if !step.quarantined.is_empty() || was_handshake {
                        match blocking(|| crate::port::SyncPort::quarantined_count(&*replica)) {
                            Ok(n) => self.publish(|s| s.quarantined = n),
                            Err(e) => tracing::warn!(error = %e, "cannot count quarantined change sets"),
                        }
                    }
                    for m in &step.send {
                        if let Err(e) = send(&out, m) {
                            return SessionEnd::Failed(e);
                        }
                    }
                    if was_handshake && client.phase() == Phase::Streaming {
                        self.publish(|s| {
                            s.connects += 1;
                            s.last_error = None;
                        });
                        // Answers any sync_now made before or while connecting.
                        if let Err(e) = self.ping(&out, &mut nonce, &mut inflight) {
                            return SessionEnd::Failed(e);
                        }
                    }
                    self.report(&client, start_cursor, acked_this_session);
                    if let Some(n) = pong {
                        let mut answered = None;
                        while let Some(&(k, r)) = inflight.front() {
                            if k > n {
                                break;
                            }
                            inflight.pop_front();
                            if k == n {
                                answered = Some(r);
                            }
                        }
                        self.publish(|s| {
                            s.pongs += 1;
                            if let Some(r) = answered {
                                s.answered = s.answered.max(r);
                            }
                        });
                    }
                }
                _ = self.wake.notified() => {
                    if let Err(e) = self.push_more(&out, &mut client) {
                        return e;
                    }
                    self.report(&client, start_cursor, acked_this_session);
                }
                _ = poll.tick() => {
                    if client.phase() == Phase::Streaming {
                        if let Err(e) = self.push_more(&out, &mut client) {
                            return e;
                        }
                        self.report(&client, start_cursor, acked_this_session);
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > self.opts.ping_interval * 3 {
                        return SessionEnd::Failed(transport_err("the relay stopped answering".into()));
                    }
                    if let Err(e) = self.ping(&out, &mut nonce, &mut inflight) {
                        return SessionEnd::Failed(e);
                    }
                }
                c = self.cmd.recv() => match c {
                    None | Some(Command::Stop) => {
                        out.close().await;
                        return SessionEnd::Stop;
                    }
                    Some(Command::Pause) => {
                        out.close().await;
                        return SessionEnd::Paused;
                    }
                    Some(Command::Resume) => {}
                    Some(Command::Reconnect) => {
                        out.close().await;
                        return SessionEnd::Now;
                    }
                    Some(Command::Wake) => {
                        if client.phase() == Phase::Streaming {
                            // A pong carries the relay's head as of now: sync_now waits for it.
                            if let Err(e) = self.ping(&out, &mut nonce, &mut inflight) {
                                return SessionEnd::Failed(e);
                            }
                            if let Err(e) = self.push_more(&out, &mut client) {
                                return e;
                            }
                        }
                    }
                    Some(Command::Checksum(tx)) => {
                        nonce += 1;
                        self.checksum_waiters.push((nonce, tx));
                        if let Err(e) = send(&out, &ClientMsg::Checksum { nonce }) {
                            return SessionEnd::Failed(e);
                        }
                    }
                    Some(Command::Lease(request, tx)) => {
                        nonce += 1;
                        self.lease_waiters.push((nonce, tx));
                        if let Err(e) = send(&out, &ClientMsg::Lease { nonce, request }) {
                            return SessionEnd::Failed(e);
                        }
                    }
                }
            }
        }
    }

    /// Hands the writer every push frame the window allows (never waits on the network).
    fn push_more(
        &self,
        out: &Outbox,
        client: &mut SyncClient,
    ) -> std::result::Result<(), SessionEnd> {
        let replica = Arc::clone(&self.replica);
        loop {
            let next = blocking(|| client.poll_push(&*replica));
            match next {
                Ok(Some(m)) => send(out, &m).map_err(SessionEnd::Failed)?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let err = local_err(&e);
                    self.publish(|s| s.upload_error = Some(err.clone()));
                    return Err(SessionEnd::Failed(err));
                }
            }
        }
    }

    fn report(&self, client: &SyncClient, start_cursor: u64, acked: u64) {
        let replica = &self.replica;
        let (cursor, pending) = blocking(|| {
            (
                replica.cursor().unwrap_or(0),
                replica.pending_count().unwrap_or(0),
            )
        });
        let head = client.head();
        let online = client.phase() == Phase::Streaming;
        let refused = client.refused().cloned();
        let outdated = client.schema_outdated().cloned();
        // Caught up: nothing to push, everything the relay had applied, no snapshot pending.
        let caught_up = online
            && !client.bootstrapping()
            && pending == 0
            && cursor >= head
            && refused.is_none()
            && outdated.is_none();
        let mut synced_at = None;
        if caught_up && self.synced_cursor.swap(cursor, Ordering::Relaxed) != cursor {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            match blocking(|| replica.note_synced(now)) {
                Ok(()) => synced_at = Some(now),
                Err(e) => tracing::warn!(error = %e, "cannot record the time of the sync"),
            }
        }
        let snapshot = client.snapshot_progress();
        let uploaded_bytes = client.acked_bytes();
        self.publish(|s| {
            let acked_more = acked > s.uploading.done;
            if let Some(at) = synced_at {
                s.last_synced_at = Some(at);
                s.has_synced = true;
            }
            s.snapshot = snapshot;
            s.uploaded_bytes = uploaded_bytes;
            if online {
                s.state = ConnState::Online;
            }
            s.cursor = cursor;
            s.head = head.max(cursor);
            s.pending = pending;
            s.uploading = Progress {
                done: acked,
                total: acked + pending,
            };
            s.downloading = Progress {
                done: cursor.saturating_sub(start_cursor),
                total: head.max(cursor).saturating_sub(start_cursor),
            };
            if let Some(r) = &refused {
                let err = SyncError {
                    code: Some(r.code),
                    message: format!("push of change set {} refused: {}", r.origin_seq, r.message),
                };
                s.last_error = Some(err.clone());
                s.upload_error = Some(err);
            } else if s.refused.is_some() || acked_more {
                // The refusal was withdrawn, or pushes are acknowledged again.
                s.upload_error = None;
            }
            if let Some(o) = &outdated {
                s.download_error = Some(SyncError {
                    code: None,
                    message: format!(
                        "downloads paused: a newer app version wrote `{}`.`{}`, which this app's schema does not declare",
                        o.table, o.column
                    ),
                });
            } else if s.schema_outdated.is_some() {
                s.download_error = None;
            }
            s.refused = refused;
            s.schema_outdated = outdated;
        });
    }
}

fn send(out: &Outbox, msg: &ClientMsg) -> std::result::Result<(), SyncError> {
    out.send(msg).map_err(|e| transport_err(e.to_string()))
}

fn transport_err(message: String) -> SyncError {
    SyncError {
        code: None,
        message,
    }
}

fn local_err(e: &Error) -> SyncError {
    SyncError {
        code: None,
        message: e.to_string(),
    }
}

/// Exponential backoff with full jitter: a random delay in `[min, min·2^(n-1)]`, capped.
fn backoff(opts: &SyncOptions, failures: u32) -> Duration {
    let exp = opts
        .backoff_min
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let cap = exp.min(opts.backoff_max).max(opts.backoff_min);
    let lo = opts.backoff_min.as_millis() as u64;
    let hi = cap.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(lo..=hi.max(lo)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Schema, TableDecl};

    /// A token provider whose drop can be observed, like a foreign object in the bindings.
    struct Tokens;
    impl TokenProvider for Tokens {
        fn token(&self) -> std::result::Result<String, String> {
            Ok("t".into())
        }
    }

    #[test]
    fn a_failed_connection_is_reported_in_the_category_of_its_cause() {
        let e = |code: Option<ErrorCode>| SyncError {
            code,
            message: "m".into(),
        };
        assert!(matches!(
            failed_fast(Some(&e(None))),
            Some(Error::Transport(_))
        ));
        assert!(matches!(failed_fast(None), Some(Error::Transport(_))));
        assert!(matches!(
            failed_fast(Some(&e(Some(ErrorCode::Unauthorized)))),
            Some(Error::Refused {
                code: ErrorCode::Unauthorized,
                ..
            })
        ));
        assert!(matches!(
            failed_fast(Some(&e(Some(ErrorCode::ShuttingDown)))),
            Some(Error::Transport(m)) if m.contains("shutting_down")
        ));
        assert!(matches!(
            failed_fast(Some(&e(Some(ErrorCode::UnsupportedVersion)))),
            Some(Error::Protocol(_))
        ));
        for code in [
            ErrorCode::ClockSkew,
            ErrorCode::IdentityMismatch,
            ErrorCode::OriginReused,
        ] {
            assert!(failed_fast(Some(&e(Some(code)))).is_none(), "{code:?}");
        }
    }

    /// A session that cannot reach its relay fails `try_sync_now` at once, while `sync_now`
    /// keeps waiting.
    #[test]
    fn try_sync_now_fails_at_the_first_failed_attempt() {
        let dir = tempfile::tempdir().expect("temp dir");
        let schema = Schema::new(1).table(TableDecl::new("t").text_key("id"));
        let r = Arc::new(Replica::open(dir.path().join("a.db"), &schema).expect("open"));
        let h = r
            .connect_with(
                "ws://127.0.0.1:9/sync",
                Arc::new(Tokens),
                SyncOptions::default(),
            )
            .expect("connect");
        let rt = runtime().expect("runtime");
        let fast = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), h.try_sync_now()).await
        });
        assert!(matches!(fast, Ok(Err(Error::Transport(_)))), "{fast:?}");
        let waiting = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(300), h.sync_now()).await
        });
        assert!(
            waiting.is_err(),
            "sync_now waits while offline: {waiting:?}"
        );
        assert!(h.status().failures >= 1);
        h.disconnect();
    }

    /// An observer added while the loop pauses sees the pause, however the two interleave
    /// (it used to miss a change published between reading the status and registering).
    #[test]
    fn an_observer_added_during_a_change_sees_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let schema = Schema::new(1).table(TableDecl::new("todo").text_key("id").text("title"));
        let replica = Arc::new(Replica::open(dir.path().join("a.db"), &schema).expect("open"));
        let opts = SyncOptions {
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
            ..SyncOptions::default()
        };
        let handle = replica
            .connect_with("ws://127.0.0.1:1/sync", Arc::new(Tokens), opts)
            .expect("connect");
        for round in 0..300 {
            handle.resume();
            let deadline = Instant::now() + Duration::from_secs(5);
            while handle.status().state == ConnState::Paused {
                assert!(Instant::now() < deadline, "round {round}: never resumed");
                std::thread::sleep(Duration::from_micros(200));
            }
            handle.pause();
            let seen = Arc::new(Mutex::new(None));
            let s2 = Arc::clone(&seen);
            let _sub = handle.observe(Arc::new(move |s: &SyncStatus| {
                *s2.lock() = Some(s.state);
            }));
            // The pause is published once; the observer must have it, now or soon.
            let deadline = Instant::now() + Duration::from_millis(500);
            while *seen.lock() != Some(ConnState::Paused) {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: the observer missed the pause ({:?})",
                    handle.status().state
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    #[test]
    fn disconnect_returns_after_the_task_released_the_token_provider() {
        let dir = tempfile::tempdir().expect("temp dir");
        let schema = Schema::new(1).table(TableDecl::new("todo").text_key("id").text("title"));
        let replica = Arc::new(Replica::open(dir.path().join("a.db"), &schema).expect("open"));
        for _ in 0..20 {
            let tokens = Arc::new(Tokens);
            let provider: Arc<dyn TokenProvider> = tokens.clone();
            // Nothing listens on port 1: the task fails to connect and backs off.
            let opts = SyncOptions {
                backoff_min: Duration::from_millis(1),
                backoff_max: Duration::from_millis(5),
                ..SyncOptions::default()
            };
            let handle = replica
                .connect_with("ws://127.0.0.1:1/sync", provider, opts)
                .expect("connect");
            std::thread::sleep(Duration::from_millis(3));
            handle.disconnect();
            assert_eq!(
                Arc::strong_count(&tokens),
                1,
                "the task still holds the provider"
            );
            drop(handle);
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let o = SyncOptions {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            ..SyncOptions::default()
        };
        for n in 1..40 {
            let d = backoff(&o, n);
            assert!(d >= o.backoff_min && d <= o.backoff_max, "{n}: {d:?}");
        }
        let first = (0..50).map(|_| backoff(&o, 1)).max();
        assert_eq!(first, Some(Duration::from_millis(100)));
        let late: Vec<Duration> = (0..200).map(|_| backoff(&o, 10)).collect();
        assert!(
            late.iter().any(|d| *d > Duration::from_millis(1000)),
            "jitter reaches the cap"
        );
        assert!(
            late.iter().any(|d| *d < Duration::from_millis(1000)),
            "jitter spreads"
        );
    }

    #[test]
    fn unencrypted_urls_are_for_loopback_unless_allowed() {
        for ok in [
            "wss://relay.example.com/sync",
            "ws://127.0.0.1:7070/sync",
            "ws://127.8.9.10/sync",
            "ws://localhost:1/sync",
            "ws://[::1]:7070/sync",
        ] {
            assert!(check_relay_url(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "ws://relay.example.com/sync",
            "ws://10.0.2.2:7070/sync",
            "ws://[2001:db8::1]/sync",
            "ws://localhost.evil.com/sync",
            "ws://127.0.0.1.nip.io/sync",
        ] {
            let e = check_relay_url(bad, false).expect_err(bad);
            assert!(matches!(e, Error::InvalidInput(_)), "{bad}: {e}");
            assert!(e.to_string().contains("unencrypted"), "{e}");
            assert!(
                check_relay_url(bad, true).is_ok(),
                "{bad} allowed by opt-in"
            );
        }
        for never in ["http://relay.example.com", "relay:7070", ""] {
            assert!(check_relay_url(never, true).is_err(), "{never}");
        }
    }
}
