//! Accepting sockets: every accepted socket is counted against `limits.max_connections`
//! from the moment it is accepted, and HTTP headers must arrive within
//! `limits.header_timeout`.
//!
//! Why not `axum::serve`: it sets no header-read timeout, and it counts nothing before the
//! WebSocket upgrade. In review, 1,500 connections sending partial headers stayed open past
//! every timeout, and bare TCP connections were never closed. A good client was admitted with
//! the limit at 50 while 330 such sockets were held. Here, a socket over the limit is closed
//! as soon as it is accepted. A socket is counted in `RelayState::sockets` until its HTTP
//! connection ends or is upgraded. From the upgrade on, the session counts it in
//! `connections` (see `session`), and the check is one atomic step in both places.
//!
//! Each socket also holds a place among its peer address's (`limits.max_connections_per_ip`)
//! for its whole life: the place ([`IpSlot`]) travels with the request into the upgrade and
//! is given back when both the HTTP connection and the sync session have ended.

use crate::state::RelayState;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// An accepted socket's place in the connection limit, given back when dropped.
struct Slot(Arc<RelayState>);

impl Slot {
    /// Takes a place if sockets and sync connections together are below the limit.
    fn take(shared: &Arc<RelayState>) -> Option<Slot> {
        let max = shared.cfg.limits.max_connections;
        let before = shared.sockets.fetch_add(1, Ordering::AcqRel);
        if before + shared.connections.load(Ordering::Acquire) >= max {
            shared.sockets.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(Arc::clone(shared)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A socket's place among those of its peer address, given back when the last holder (the
/// HTTP connection, the sync session) drops it.
pub struct IpSlot {
    shared: Arc<RelayState>,
    ip: IpAddr,
}

impl IpSlot {
    /// Takes a place if `ip` holds fewer than `limits.max_connections_per_ip` sockets.
    fn take(shared: &Arc<RelayState>, ip: IpAddr) -> Option<Arc<IpSlot>> {
        let mut per_ip = shared.per_ip.lock();
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= shared.cfg.limits.max_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(Arc::new(IpSlot {
            shared: Arc::clone(shared),
            ip,
        }))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut per_ip = self.shared.per_ip.lock();
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Serves `app` on `listener` until `stop`; open HTTP connections then finish their request
/// (upgraded sync connections are the sessions', which watch `stop` themselves).
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    shared: Arc<RelayState>,
    stop: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(shared.cfg.limits.header_timeout);
    let buffer = shared.cfg.limits.socket_buffer_bytes;
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Some(slot) = Slot::take(&shared) else {
            metrics::counter!(crate::metrics::SOCKETS_REFUSED, "limit" => "total").increment(1);
            tracing::debug!(%peer, "socket refused: at the connection limit");
            drop(tcp);
            continue;
        };
        let Some(ip_slot) = IpSlot::take(&shared, peer.ip()) else {
            metrics::counter!(crate::metrics::SOCKETS_REFUSED, "limit" => "per_ip").increment(1);
            tracing::debug!(%peer, "socket refused: at the limit for its address");
            drop(tcp);
            continue;
        };
        // Frames are small and often back to back (changes, then an ack): without
        // TCP_NODELAY, Nagle's algorithm holds the second until the peer's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        if let Some(n) = buffer {
            let sock = socket2::SockRef::from(&tcp);
            if let Err(e) = sock
                .set_send_buffer_size(n)
                .and_then(|()| sock.set_recv_buffer_size(n))
            {
                tracing::debug!(error = %e, "socket buffer size not set");
            }
        }
        // Every request of the connection carries its address's place, so an upgrade hands
        // it on to the session.
        let with_slot = {
            let app = app.clone();
            let ip_slot = Arc::clone(&ip_slot);
            tower::service_fn(
                move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(Arc::clone(&ip_slot));
                    let mut app = app.clone();
                    async move { tower::Service::call(&mut app, req).await }
                },
            )
        };
        let conn = http
            .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(with_slot))
            .with_upgrades();
        let stop = stop.clone();
        // Tracked with the sessions: shutdown waits for both.
        shared.tasks.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(Duration::from_secs(10), conn.as_mut())
                        .await
                        .unwrap_or(Ok(()))
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            drop(slot);
            drop(ip_slot);
        });
    }
}
