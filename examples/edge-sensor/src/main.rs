//! `edge-sensor`: a device that appends a reading every few milliseconds to its local
//! replica, whatever its network link does, and syncs whenever the link is up.
//!
//! The link is simulated by pausing and resuming the sync loop at random intervals (a real
//! device would see the connection drop; Ferry's loop reconnects on its own either way). At
//! the end the link comes back, the device syncs, and the relay's checksum proves that it
//! holds every reading.
//!
//! ```text
//! edge-sensor --relay ws://127.0.0.1:7070/sync --token "$TOKEN" --device dev-1 --readings 500
//! ```
#![allow(clippy::print_stdout)]

use clap::Parser;
use ferry_core::{Replica, Schema, SyncStatus, Value};
use rand::RngExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SCHEMA: &str = include_str!("../schema.json");

#[derive(Parser, Debug)]
#[command(
    name = "edge-sensor",
    about = "Appends readings offline-first and syncs when the link is up"
)]
struct Cli {
    /// Local replica file.
    #[arg(long, default_value = "sensor.db")]
    db: PathBuf,
    /// Relay URL.
    #[arg(long, env = "FERRY_RELAY", default_value = "ws://127.0.0.1:7070/sync")]
    relay: String,
    /// Bearer token with write access to `device:<id>`.
    #[arg(long, env = "FERRY_TOKEN")]
    token: String,
    /// Device id (the scope is `device:<id>`).
    #[arg(long, default_value = "dev-1")]
    device: String,
    /// Readings to take.
    #[arg(long, default_value_t = 300)]
    readings: u64,
    /// Milliseconds between readings.
    #[arg(long, default_value_t = 10)]
    every_ms: u64,
    /// Mean milliseconds the link stays up, then down.
    #[arg(long, default_value_t = 300)]
    flap_ms: u64,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-sensor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> ferry_core::Result<()> {
    let schema: Schema = serde_json::from_str(SCHEMA)
        .map_err(|e| ferry_core::Error::InvalidSchema(format!("schema.json: {e}")))?;
    let replica = Arc::new(Replica::open(&cli.db, &schema)?);
    let token = cli.token.clone();
    let sync = replica.connect(&cli.relay, Arc::new(move || Ok(token.clone())))?;
    let max_pending = Arc::new(AtomicU64::new(0));
    let mp = Arc::clone(&max_pending);
    let _watch = sync.observe(Arc::new(move |s: &SyncStatus| {
        mp.fetch_max(s.pending, Ordering::Relaxed);
    }));
    let scope = format!("device:{}", cli.device);
    let start_seq: i64 = match replica
        .query(
            "SELECT coalesce(max(seq), 0) FROM reading WHERE device = ?1",
            &[scope.clone().into()],
        )?
        .rows
        .first()
        .and_then(|r| r.first())
    {
        Some(Value::Integer(n)) => *n,
        _ => 0,
    };
    let mut rng = rand::rng();
    let mut link_up = true;
    let mut flips = 0u32;
    let mut next_flip =
        Instant::now() + Duration::from_millis(rng.random_range(1..=2 * cli.flap_ms.max(1)));
    let t0 = Instant::now();
    for i in 1..=cli.readings {
        let seq = start_seq + i as i64;
        let value = 20.0 + (seq as f64 / 10.0).sin() * 5.0 + rng.random_range(-0.5..0.5);
        replica.execute(
            "INSERT INTO reading(id, device, seq, at_ms, value) VALUES (?1, ?2, ?3, ?4, ?5)",
            &[
                replica.new_id().into(),
                scope.clone().into(),
                seq.into(),
                (t0.elapsed().as_millis() as i64).into(),
                value.into(),
            ],
        )?;
        if Instant::now() >= next_flip {
            link_up = !link_up;
            flips += 1;
            if link_up {
                sync.resume()
            } else {
                sync.pause()
            }
            next_flip = Instant::now()
                + Duration::from_millis(rng.random_range(1..=2 * cli.flap_ms.max(1)));
        }
        std::thread::sleep(Duration::from_millis(cli.every_ms));
    }
    sync.resume();
    sync.sync_now_blocking(Duration::from_secs(60))?;
    let v = sync.verify_blocking(&replica, Duration::from_secs(60))?;
    let s = sync.status();
    println!(
        "{}: {} readings in {:.1}s, link went down {} times, up to {} change sets waited offline, {} connections; relay position {}; checksum {} ({} rows)",
        cli.device,
        cli.readings,
        t0.elapsed().as_secs_f64(),
        flips.div_ceil(2),
        max_pending.load(Ordering::Relaxed),
        s.connects,
        s.cursor,
        if v.matches() {
            "matches the relay"
        } else {
            "DIFFERS from the relay"
        },
        v.local_rows,
    );
    if !v.matches() {
        return Err(ferry_core::Error::Corrupt(
            "replica differs from the relay".into(),
        ));
    }
    Ok(())
}
