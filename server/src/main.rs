//! `ferry-relay`: serve, mint development tokens, check a configuration.

use clap::{Parser, Subcommand};
use ferry_relay::auth::{Claims, hs256_secret, mint_hs256, now_secs};
use ferry_relay::{Config, RelayError};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The Ferry relay: orders, stores and fans out change sets.
#[derive(Parser, Debug)]
#[command(name = "ferry-relay", version, about)]
struct Cli {
    /// Configuration file (TOML; see server/config.example.toml). Environment variables
    /// FERRY_LISTEN, FERRY_DATA, FERRY_STORE, FERRY_SCHEMA, FERRY_JWT_SECRET, FERRY_JWKS_FILE,
    /// FERRY_LOG and FERRY_LOG_FORMAT override it; flags override both.
    #[arg(long, short, global = true, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay (the default command).
    Serve(ServeArgs),
    /// Print a development HS256 token signed with the configured secret.
    Token(TokenArgs),
    /// Validate the configuration (files, keys, schema) and print the effective settings.
    CheckConfig(ServeArgs),
}

#[derive(clap::Args, Debug, Default)]
struct ServeArgs {
    /// Address to listen on (127.0.0.1:0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory.
    #[arg(long)]
    data: Option<PathBuf>,
    /// App schema JSON.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// `sqlite` or a postgres:// URL.
    #[arg(long)]
    store: Option<String>,
}

#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// Subject (user or device id).
    #[arg(long)]
    sub: String,
    /// Readable scope pattern (repeatable; `{sub}` and `*` allowed).
    #[arg(long = "read")]
    read: Vec<String>,
    /// Writable scope pattern (repeatable).
    #[arg(long = "write")]
    write: Vec<String>,
    /// read_only table this token may write (repeatable; `*` for all).
    #[arg(long = "primary")]
    primary: Vec<String>,
    /// Lifetime, e.g. `1h`, `30m`, `7d`.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

fn load(cli_config: &Option<PathBuf>, args: &ServeArgs) -> Result<Config, RelayError> {
    let mut cfg = match cli_config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    cfg.apply_env(|k| std::env::var(k).ok());
    if let Some(v) = &args.listen {
        cfg.listen = v.clone();
    }
    if let Some(v) = &args.data {
        cfg.data = v.clone();
    }
    if let Some(v) = &args.schema {
        cfg.schema = Some(v.clone());
    }
    if let Some(v) = &args.store {
        cfg.store = v.clone();
    }
    Ok(cfg)
}

fn init_logs(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), RelayError> {
    let command = cli.command.unwrap_or(Command::Serve(ServeArgs::default()));
    match command {
        Command::Serve(args) => {
            let cfg = load(&cli.config, &args)?;
            init_logs(&cfg);
            // One socket per connection: allow as many as the hard limit permits.
            match rlimit::increase_nofile_limit(u64::MAX) {
                Ok(n) => tracing::debug!(limit = n, "open file limit"),
                Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("ferry-relay")
                .build()?;
            rt.block_on(ferry_relay::server::run(cfg, |addr, admin| {
                let mut out = std::io::stdout();
                let _ = writeln!(out, "ferry-relay listening on {addr}");
                let _ = writeln!(out, "ferry-relay admin (metrics, readiness) on {admin}");
                let _ = out.flush();
            }))
        }
        Command::CheckConfig(args) => {
            let cfg = load(&cli.config, &args)?;
            ferry_relay::server::check_config(&cfg)?;
            let (path, schema) = ferry_relay::catalog::read_schema(&cfg)?;
            let path = path.to_path_buf();
            let text = toml::to_string_pretty(&redacted(cfg))
                .map_err(|e| RelayError::Config(e.to_string()))?;
            let tables: String = schema
                .describe()
                .lines()
                .map(|l| format!("#   {l}\n"))
                .collect();
            let mut out = std::io::stdout();
            let _ = writeln!(
                out,
                "# configuration is valid; effective settings:\n{text}\n# tables of {} (app schema version {}):\n{tables}",
                path.display(),
                schema.version
            );
            Ok(())
        }
        Command::Token(t) => {
            // Secrets come from the file or the environment, never a flag: flags show in `ps`.
            let cfg = load(&cli.config, &ServeArgs::default())?;
            let secret = hs256_secret(&cfg.auth)?.ok_or_else(|| {
                RelayError::Config(
                    "no HS256 secret: set FERRY_JWT_SECRET, auth.hs256_secret_file or auth.hs256_secret"
                        .into(),
                )
            })?;
            if t.ttl > cfg.auth.max_token_lifetime {
                return Err(RelayError::Config(format!(
                    "--ttl {:?} is longer than auth.max_token_lifetime ({:?}): the relay would refuse the token",
                    t.ttl, cfg.auth.max_token_lifetime
                )));
            }
            let now = now_secs();
            let claims = Claims {
                sub: t.sub,
                exp: now + t.ttl.as_secs(),
                read: t.read,
                write: t.write,
                primary: t.primary,
                iss: cfg.auth.issuer.clone(),
                aud: cfg.auth.audience.as_deref().map(Into::into),
                nbf: None,
                iat: Some(now),
            };
            let token = mint_hs256(&secret, &claims)?;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{token}");
            Ok(())
        }
    }
}

fn redacted(mut cfg: Config) -> Config {
    if cfg.auth.hs256_secret.is_some() {
        cfg.auth.hs256_secret = Some("<redacted>".into());
    }
    cfg.store = ferry_relay::store::postgres::redact_url(&cfg.store);
    cfg
}
