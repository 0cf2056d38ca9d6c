//! Ferry's log records, handed to the app. Core logs through `tracing` (a refused push, a
//! resolver or listener that threw, a watched query that failed, an eviction); on a device
//! nothing prints those unless the app receives them, so `set_logger` installs, once per
//! process, a `tracing` subscriber that forwards each record at or above the chosen level to
//! the app's `LogSink` (Logcat, `os_log`, Python's `logging`). The level and the logger can be
//! changed or removed at any time; with none set, records are dropped at the level check.
//!
//! A logger that calls back into Ferry from `log` would log again on the same thread: such
//! nested records are dropped rather than recursing.

use crate::error::{FerryError, Result};
use parking_lot::RwLock;
use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// How much Ferry tells the app, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum LogLevel {
    /// Something failed and Ferry could not go on with it.
    Error,
    /// Something the app should know: a refused push, a callback that threw.
    Warn,
    /// Notable events: an eviction, a quarantine decision.
    Info,
    /// Detail for debugging.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// Its verbosity: error 1 … trace 5 (0 is "none", in [`LEVEL`]).
    fn rank(self) -> u8 {
        match self {
            LogLevel::Error => 1,
            LogLevel::Warn => 2,
            LogLevel::Info => 3,
            LogLevel::Debug => 4,
            LogLevel::Trace => 5,
        }
    }

    fn of(level: &tracing::Level) -> LogLevel {
        match *level {
            tracing::Level::ERROR => LogLevel::Error,
            tracing::Level::WARN => LogLevel::Warn,
            tracing::Level::INFO => LogLevel::Info,
            tracing::Level::DEBUG => LogLevel::Debug,
            tracing::Level::TRACE => LogLevel::Trace,
        }
    }
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct LogRecord {
    /// Its level.
    pub level: LogLevel,
    /// Where it comes from (a Rust module path, e.g. `ferry_core::sync`).
    pub target: String,
    /// The message, then its fields as `name=value`.
    pub message: String,
}

/// Receives Ferry's log records (on whichever thread logged: keep it short). An error it
/// returns is ignored.
#[uniffi::export(with_foreign)]
pub trait LogSink: Send + Sync {
    /// One record at or above the level given to `setLogger`.
    fn log(&self, record: LogRecord) -> std::result::Result<(), FerryError>;
}

/// The app's logger; read only for records that pass [`LEVEL`].
static SINK: RwLock<Option<Arc<dyn LogSink>>> = RwLock::new(None);
/// The most verbose level forwarded ([`rank`]; 0: none): one atomic load decides a record,
/// and callsites below it are switched off in `tracing`'s interest cache.
static LEVEL: AtomicU8 = AtomicU8::new(0);

fn passes(level: &tracing::Level) -> bool {
    LogLevel::of(level).rank() <= LEVEL.load(Ordering::Relaxed)
}
static INSTALLED: OnceLock<bool> = OnceLock::new();

thread_local! {
    static LOGGING: Cell<bool> = const { Cell::new(false) };
}

/// Sends Ferry's log records at `level` and above to `logger` (None: to nobody). Fails with
/// `InvalidInput` when another `tracing` subscriber was already installed in this process
/// (an app that embeds Rust code of its own and set one).
#[uniffi::export]
pub fn set_logger(logger: Option<Arc<dyn LogSink>>, level: LogLevel) -> Result<()> {
    let installed = *INSTALLED.get_or_init(|| {
        let subscriber = tracing_subscriber::registry().with(Forward);
        tracing::subscriber::set_global_default(subscriber).is_ok()
    });
    if !installed {
        return Err(FerryError::InvalidInput {
            reason: "another tracing subscriber is installed in this process: Ferry's records \
                     already go there"
                .into(),
        });
    }
    let most = if logger.is_some() { level.rank() } else { 0 };
    *SINK.write() = logger;
    LEVEL.store(most, Ordering::Relaxed);
    // Callsites cached as off (or on) are asked again under the new level.
    tracing::callsite::rebuild_interest_cache();
    Ok(())
}

/// The layer that forwards events to the app's logger.
struct Forward;

impl<S: Subscriber> Layer<S> for Forward {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        // Asked again whenever the level changes (`set_logger` rebuilds the cache).
        if passes(metadata.level()) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        passes(metadata.level())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(match LEVEL.load(Ordering::Relaxed) {
            0 => LevelFilter::OFF,
            1 => LevelFilter::ERROR,
            2 => LevelFilter::WARN,
            3 => LevelFilter::INFO,
            4 => LevelFilter::DEBUG,
            _ => LevelFilter::TRACE,
        })
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if LOGGING.with(Cell::get) {
            return;
        }
        let Some(logger) = SINK.read().as_ref().map(Arc::clone) else {
            return;
        };
        let mut text = Text::default();
        event.record(&mut text);
        let meta = event.metadata();
        let record = LogRecord {
            level: LogLevel::of(meta.level()),
            target: meta.target().to_owned(),
            message: text.finish(),
        };
        LOGGING.with(|l| l.set(true));
        // The app's logger failing has nowhere else to be reported.
        let _ = logger.log(record);
        LOGGING.with(|l| l.set(false));
    }
}

/// An event's message and fields as one line.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Text {
    fn finish(self) -> String {
        match (self.message.is_empty(), self.fields.is_empty()) {
            (_, true) => self.message,
            (true, false) => self.fields,
            (false, false) => format!("{} {}", self.message, self.fields),
        }
    }
}

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.record_debug(field, &format_args!("{value}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            if !self.fields.is_empty() {
                self.fields.push(' ');
            }
            let _ = write!(self.fields, "{}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    struct Collect(Mutex<Vec<LogRecord>>);

    impl LogSink for Collect {
        fn log(&self, record: LogRecord) -> std::result::Result<(), FerryError> {
            // Logging from inside the logger is dropped, not recursed into.
            tracing::warn!("from inside the logger");
            self.0.lock().push(record);
            Ok(())
        }
    }

    #[test]
    fn records_at_the_level_reach_the_logger_until_it_is_removed() {
        let c = Arc::new(Collect(Mutex::new(Vec::new())));
        set_logger(Some(c.clone()), LogLevel::Info).unwrap_or_else(|e| panic!("{e}"));
        tracing::debug!("below the level");
        tracing::warn!(table = "todo", rows = 3, "a refused push");
        set_logger(Some(c.clone()), LogLevel::Debug).unwrap_or_else(|e| panic!("{e}"));
        tracing::debug!("now at the level");
        set_logger(None, LogLevel::Trace).unwrap_or_else(|e| panic!("{e}"));
        tracing::error!("nobody listens");
        let got = c.0.lock().clone();
        assert_eq!(
            got.iter().map(|r| r.message.as_str()).collect::<Vec<_>>(),
            ["a refused push table=todo rows=3", "now at the level"],
            "{got:?}"
        );
        assert_eq!(got[0].level, LogLevel::Warn);
        assert!(got[0].target.contains("logging"), "{got:?}");
    }
}
