//! The relay process: HTTP routes, WebSocket upgrades, background tasks, graceful shutdown.
//!
//! Routes on the sync listener: `/sync` (the WebSocket protocol) and `/healthz` (the process
//! answers); nothing else is served to the public. On the admin listener (loopback by
//! default, see `admin_listen`): `/readyz` (the store answers and the relay is not shutting
//! down) and `/metrics` (Prometheus text), which tell an outsider about the relay's traffic.
//!
//! Shutdown (SIGTERM, SIGINT, or [`Relay::shutdown`]): stop accepting connections; every
//! connection finishes the frame it is handling (a push in flight is stored and acknowledged)
//! and then gets a `shutting_down` error frame; the store drains its queue and closes.

use crate::auth::Verifier;
use crate::catalog::RelayCatalog;
use crate::checksum_replica::ChecksumReplica;
use crate::config::{Config, StoreKind};
use crate::error::{RelayError, Result};
use crate::metrics as m;
use crate::session;
use crate::state::RelayState;
use crate::store::Store;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Change sets kept in memory for live fan-out.
const FEED_WINDOW: usize = 4096;
/// Memory they may hold: enough for a few seconds of heavy traffic, little beside a device's
/// bulk upload (a connection further behind reads the store).
const FEED_WINDOW_BYTES: usize = 32 << 20;

/// A running relay.
pub struct Relay {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The admin listener's address (`/metrics`, `/readyz`).
    pub admin_addr: SocketAddr,
    shared: Arc<RelayState>,
    server: tokio::task::JoinHandle<()>,
    background: TaskTracker,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("addr", &self.addr).finish()
    }
}

/// Checks everything in `cfg` that can be checked without starting: the settings, the
/// PostgreSQL URL, and that the schema file and the token keys load.
pub fn check_config(cfg: &Config) -> Result<()> {
    cfg.validate()?;
    if let StoreKind::Postgres(url) = cfg.store_kind()? {
        crate::store::postgres::check_url(&url)?;
    }
    RelayCatalog::load(cfg)?;
    Verifier::from_config(&cfg.auth)?;
    Ok(())
}

impl Relay {
    /// Validates the configuration, opens the store, binds and starts serving.
    pub async fn start(cfg: Config) -> Result<Relay> {
        check_config(&cfg)?;
        let cat = Arc::new(RelayCatalog::load(&cfg)?);
        let verifier = Verifier::from_config(&cfg.auth)?;
        let store: Arc<dyn Store> = match cfg.store_kind()? {
            StoreKind::Sqlite => {
                let dir = cfg.data.clone();
                let c = Arc::clone(&cat);
                tokio::task::spawn_blocking(move || {
                    SqliteStore::open_with_window_bytes(&dir, c, FEED_WINDOW, FEED_WINDOW_BYTES)
                })
                .await
                .map_err(|e| RelayError::Store(format!("opening the store failed: {e}")))??
            }
            StoreKind::Postgres(url) => {
                PgStore::open(&url, Arc::clone(&cat), FEED_WINDOW, FEED_WINDOW_BYTES).await?
            }
        };
        let handle = m::handle();
        let shutdown = CancellationToken::new();
        let background = TaskTracker::new();
        let shadow = if cfg.checksums.enabled {
            let dir = cfg.data.clone();
            let schema = cat.schema.clone();
            let head = store.feed().head();
            let sh =
                tokio::task::spawn_blocking(move || ChecksumReplica::open(&dir, &schema, head))
                    .await
                    .map_err(|e| {
                        RelayError::Store(format!("opening the checksum state failed: {e}"))
                    })??;
            let sh = Arc::new(sh);
            background.spawn(Arc::clone(&sh).follow(Arc::clone(&store), shutdown.clone()));
            Some(sh)
        } else {
            None
        };
        let folded = Arc::new(AtomicU64::new(0));
        background.spawn(folder(
            Arc::clone(&store),
            Arc::clone(&folded),
            shutdown.clone(),
        ));
        if cfg.retention.keep_change_sets > 0 {
            background.spawn(compactor(
                Arc::clone(&store),
                folded,
                cfg.retention.keep_change_sets,
                cfg.retention.compact_every,
                shutdown.clone(),
            ));
        }
        let addr = cfg.listen_addr()?;
        let cfg = Arc::new(cfg);
        let shared = Arc::new(RelayState::new(
            Arc::clone(&cfg),
            cat,
            verifier,
            store,
            shadow,
            Arc::new(crate::clock::now_ms),
            shutdown.clone(),
        ));
        let app = axum::Router::new()
            .route("/sync", get(upgrade))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(Arc::clone(&shared));
        let admin = axum::Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .route("/metrics", get(move || async move { handle.render() }))
            .with_state(Arc::clone(&shared));
        let admin_addr = cfg.admin_addr()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| RelayError::Config(format!("cannot listen on {addr}: {e}")))?;
        let admin_listener = tokio::net::TcpListener::bind(admin_addr)
            .await
            .map_err(|e| {
                RelayError::Config(format!("cannot listen on {admin_addr} (admin_listen): {e}"))
            })?;
        let addr = listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let server = tokio::spawn(crate::accept::serve(
            listener,
            app,
            Arc::clone(&shared),
            shutdown.clone(),
        ));
        // The admin listener shares the socket accounting: its sockets count against
        // `max_connections` like any other.
        background.spawn(crate::accept::serve(
            admin_listener,
            admin,
            Arc::clone(&shared),
            shutdown.clone(),
        ));
        metrics::gauge!(m::HEAD).set(shared.store.feed().head() as f64);
        tracing::info!(%addr, %admin_addr, "relay listening");
        Ok(Relay {
            addr,
            admin_addr,
            shared,
            server,
            background,
        })
    }

    /// The store (tests inspect it).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// A token that shuts the relay down when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Graceful shutdown: stop accepting, let connections finish their frame, close the store.
    pub async fn shutdown(self) -> Result<()> {
        self.shared.shutdown.cancel();
        self.wait().await
    }

    /// Waits until shut down (by [`Relay::shutdown_token`] or a signal handler).
    pub async fn wait(self) -> Result<()> {
        self.shared.shutdown.cancelled().await;
        let _ = self.server.await;
        self.shared.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections did not close within 10 s");
        }
        self.background.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.background.wait()).await;
        self.shared.store.shutdown().await;
        tracing::info!("relay stopped");
        Ok(())
    }
}

async fn upgrade(
    State(shared): State<Arc<RelayState>>,
    ip_slot: Option<axum::Extension<Arc<crate::accept::IpSlot>>>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> impl IntoResponse {
    // Before its hello is verified a connection may only send small frames, unless its
    // upgrade request presented a valid token: a stranger cannot make the relay buffer
    // `max_frame_bytes` per socket. (The hello's token is verified again, as always.)
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| shared.verifier.verify(t.trim()).is_ok());
    let limits = &shared.cfg.limits;
    let max = if presented {
        limits.max_frame_bytes
    } else {
        limits.preauth_frame_bytes
    };
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(max.saturating_mul(2))
        .on_upgrade(move |socket| {
            let s = Arc::clone(&shared);
            let tasks = shared.tasks.clone();
            async move {
                // The socket keeps its address's place for the session's life.
                let _ip_slot = ip_slot;
                // Counted before it is checked, so two upgrades at the limit cannot both
                // pass (sockets not yet upgraded count too, see `accept`).
                let max = s.cfg.limits.max_connections;
                let before = s.connections.fetch_add(1, Ordering::AcqRel);
                if before + s.sockets.load(Ordering::Acquire) >= max {
                    s.connections.fetch_sub(1, Ordering::AcqRel);
                    reject_busy(socket, max).await;
                    return;
                }
                tasks.track_future(session::serve(s, socket)).await;
            }
        })
}

async fn reject_busy(mut socket: axum::extract::ws::WebSocket, max: usize) {
    use axum::extract::ws::Message;
    let frame = ferry_core::protocol::ServerMsg::Error {
        code: ferry_core::protocol::ErrorCode::RateLimited,
        message: format!("the relay is at its limit of {max} connections; try again later"),
    };
    if let Ok(b) = frame.encode() {
        let _ = socket.send(Message::Binary(b.into())).await;
    }
    let _ = socket.send(Message::Close(None)).await;
}

async fn ready(State(shared): State<Arc<RelayState>>) -> impl IntoResponse {
    if shared.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_owned(),
        );
    }
    match tokio::time::timeout(Duration::from_secs(2), shared.store.stats()).await {
        Ok(Ok(s)) => {
            metrics::gauge!(m::HEAD).set(s.head as f64);
            (
                StatusCode::OK,
                format!("ready head={} horizon={}\n", s.head, s.horizon),
            )
        }
        Ok(Err(e)) => {
            // The details stay in the log: they may name hosts, paths or database users.
            tracing::warn!(error = %e, "readiness check: the store failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable (see the relay's log)\n".to_owned(),
            )
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "store did not answer\n".to_owned(),
        ),
    }
}

/// Compacts history older than `keep` change sets behind the head, never past what the row
/// histories have folded (`folded`): the fold reads change sets as they were written.
async fn compactor(
    store: Arc<dyn Store>,
    folded: Arc<AtomicU64>,
    keep: u64,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let head = store.feed().head();
        let horizon = head
            .saturating_sub(keep)
            .min(folded.load(Ordering::Relaxed));
        if horizon == 0 {
            continue;
        }
        if let Err(e) = store.compact(horizon).await {
            tracing::warn!(error = %e, "compaction failed");
        }
    }
}

/// Row changes folded into the row histories per store transaction (a few tens of
/// milliseconds of the writer's time, so pushes wait little behind it).
const FOLD_ROWS: usize = 8192;

/// While pushes keep coming, the fold waits for a pause this long…
const FOLD_QUIET: Duration = Duration::from_millis(50);
/// …but not longer than this between two folds.
const FOLD_AT_LEAST_EVERY: Duration = Duration::from_secs(2);

/// Keeps the row histories that snapshots read (see `history`) folded up to the head. Pushes
/// come first: the fold runs when the head has been still for a moment, and at least every two
/// seconds, so a burst of pushes is sequenced at full speed and folded after (a snapshot
/// taken meanwhile is a little older and the device catches up the rest from the log).
async fn folder(store: Arc<dyn Store>, folded: Arc<AtomicU64>, stop: CancellationToken) {
    let mut heads = store.feed().subscribe();
    let mut last_fold = tokio::time::Instant::now();
    loop {
        let waited_from = tokio::time::Instant::now();
        let mut seen = store.feed().head();
        while waited_from.elapsed() < FOLD_AT_LEAST_EVERY
            && last_fold.elapsed() < FOLD_AT_LEAST_EVERY
        {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(FOLD_QUIET) => {}
            }
            let now = store.feed().head();
            if now == seen {
                break;
            }
            seen = now;
        }
        last_fold = tokio::time::Instant::now();
        let idle = match store.fold_rows(FOLD_ROWS).await {
            Ok(at) => {
                metrics::gauge!(m::ROWS_POSITION).set(at as f64);
                folded.store(at, Ordering::Relaxed);
                at >= store.feed().head()
            }
            Err(RelayError::ShuttingDown) => return,
            Err(e) => {
                tracing::warn!(error = %e, "folding row histories failed");
                true
            }
        };
        if idle {
            // Caught up: wait for news (another node's commits reach this node's feed too).
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = heads.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        } else if stop.is_cancelled() {
            return;
        }
    }
}

/// Runs a relay until SIGTERM or SIGINT, then shuts it down gracefully.
/// `on_listening` gets the sync and the admin addresses.
pub async fn run(cfg: Config, on_listening: impl FnOnce(SocketAddr, SocketAddr)) -> Result<()> {
    let relay = Relay::start(cfg).await?;
    on_listening(relay.addr, relay.admin_addr);
    let token = relay.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; shutting down");
        token.cancel();
    });
    relay.wait().await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
