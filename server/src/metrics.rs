//! Prometheus metrics: names in one place, and the recorder behind `/metrics`.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Open connections (gauge).
pub const CONNECTIONS: &str = "ferry_connections";
/// Sockets closed as soon as accepted (counter, label `limit`: `total` at
/// `max_connections`, `per_ip` at `max_connections_per_ip`).
pub const SOCKETS_REFUSED: &str = "ferry_sockets_refused_total";
/// Connections accepted (counter).
pub const CONNECTIONS_TOTAL: &str = "ferry_connections_total";
/// Change sets received and sequenced (counter).
pub const SETS_IN: &str = "ferry_change_sets_in_total";
/// Change set parts sent (counter).
pub const SETS_OUT: &str = "ferry_change_sets_out_total";
/// Change sets read from the store for catch-up (counter): what reconnects cost.
pub const STORE_SETS_READ: &str = "ferry_store_sets_read_total";
/// Frame bytes received (counter).
pub const BYTES_IN: &str = "ferry_bytes_in_total";
/// Frame bytes sent (counter).
pub const BYTES_OUT: &str = "ferry_bytes_out_total";
/// Push handling time, receive to durable ack (histogram, seconds).
pub const PUSH_SECONDS: &str = "ferry_push_seconds";
/// Relay positions a connection had not been sent yet, observed at each catch-up step
/// (histogram). No replica label: replica ids are not for the public (see
/// `docs/security.md`), and a series per replica grows with the fleet.
pub const REPLICA_LAG: &str = "ferry_replica_lag";
/// Highest sequenced position (gauge).
pub const HEAD: &str = "ferry_head";
/// Pushes refused (counter, label `code`).
pub const REFUSED: &str = "ferry_refused_total";
/// Connections closed with an error frame (counter, label `code`).
pub const ERRORS: &str = "ferry_errors_total";
/// Lease requests answered (counter, label `outcome`).
pub const LEASES: &str = "ferry_lease_requests_total";
/// Checksums answered (counter, label `cached`: from the cache or by a scan).
pub const CHECKSUMS: &str = "ferry_checksums_total";
/// Position the checksum state has applied (gauge).
pub const SHADOW_POSITION: &str = "ferry_checksum_position";
/// Rows sent in snapshots (counter).
pub const SNAPSHOT_ROWS: &str = "ferry_snapshot_rows_total";
/// Position the row histories (snapshots) are folded up to (gauge).
pub const ROWS_POSITION: &str = "ferry_rows_position";

/// Installs the process-wide recorder once and returns its handle.
pub fn handle() -> PrometheusHandle {
    static H: OnceLock<PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .idle_timeout(
                metrics_util::MetricKindMask::GAUGE,
                Some(std::time::Duration::from_secs(300)),
            )
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(PUSH_SECONDS.to_owned()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                ],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(REPLICA_LAG.to_owned()),
                    &[0.0, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6],
                )
            })
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        // Fails only when another recorder is installed already; this one then stays unused.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
    .clone()
}
