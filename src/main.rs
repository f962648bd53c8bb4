//! The `terrapeak` binary: flags, configuration, telemetry, then the server.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use terrapeak::config::{Config, LogFormat, Overrides};
use terrapeak::log_writer;
use terrapeak::server::Server;

#[derive(Parser, Debug)]
#[command(
    name = "terrapeak",
    version,
    about = "A pull-through caching proxy for the Terraform and OpenTofu registries"
)]
struct Cli {
    /// YAML configuration file (the original TerraPeak cfg.yml keys work).
    #[arg(long, short = 'c', global = true, env = "TERRAPEAK_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (server.addr).
    #[arg(long, global = true)]
    addr: Option<String>,
    /// Public base URL written into rewritten links (server.domain).
    #[arg(long, global = true)]
    domain: Option<String>,
    /// Cache directory (storage.file.path).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Default upstream registry (terraform.registry_url).
    #[arg(long, global = true)]
    registry_url: Option<String>,
    /// Log level (log.level).
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Sealed mode (cache.offline): never contact an upstream registry or git host.
    #[arg(long, global = true)]
    offline: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (the default).
    Serve,
    /// Load and validate the configuration, print it with secrets masked.
    CheckConfig,
    /// Print the Terraform CLI configuration that points Terraform at this TerraPeak.
    ClientConfig {
        /// registry (sources name TerraPeak's host), transparent (sources unchanged), or mirror
        /// (providers only, through the network mirror protocol).
        #[arg(long, default_value = "transparent")]
        mode: terrapeak::client_config::Mode,
    },
    /// Fill the store ahead of need from lock files, root modules or a manifest (no server
    /// needed; works on the bucket replicas share).
    Warm {
        #[command(flatten)]
        select: Select,
        /// Items fetched at once.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Mark what is warmed as pinned (kept by eviction).
        #[arg(long)]
        pin: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write stored providers and modules into one verified bundle for `import` (or into
    /// Terraform's filesystem-mirror layout).
    Export {
        #[command(flatten)]
        select: Select,
        /// Everything in the store.
        #[arg(long, conflicts_with_all = ["lock_file", "root", "manifest"])]
        all: bool,
        /// The bundle file to write (a folder for --format filesystem-mirror).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The same as --out.
        #[arg(conflicts_with = "out")]
        path: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "bundle")]
        format: ExportFormat,
        /// Compress the bundle.
        #[arg(long, value_enum, default_value = "none")]
        compress: terrapeak::airgap::export::Compression,
        /// Items fetched at once when the selection is not stored yet.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify a bundle offline and publish its objects into the configured store.
    Import {
        /// The bundle written by `terrapeak export`.
        file: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run one eviction pass (storage.max_size, cache.evict_unused_after) and print what it
    /// removed.
    Gc {
        /// Print what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when the local server answers /healthz (for container health checks in images
    /// without curl).
    Healthcheck {
        /// The URL to ask; default: /healthz at server.addr (127.0.0.1 for a wildcard address).
        #[arg(long)]
        url: Option<String>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// What `warm` and `export` select.
#[derive(clap::Args, Debug)]
struct Select {
    /// A dependency lock file (.terraform.lock.hcl): its exact versions, for the platforms
    /// whose zh: hashes it lists. Repeatable.
    #[arg(long = "lock-file", value_name = "FILE")]
    lock_file: Vec<PathBuf>,
    /// A Terraform root module: required_providers and module blocks, with their version
    /// constraints; nested registry modules are followed. Repeatable.
    #[arg(long, value_name = "DIR")]
    root: Vec<PathBuf>,
    /// A YAML manifest of providers (source, version, platforms) and modules (source,
    /// version). Repeatable.
    #[arg(long, value_name = "FILE")]
    manifest: Vec<PathBuf>,
    /// A platform (os_arch) for providers whose platforms are not given otherwise; default:
    /// this machine's. Repeatable.
    #[arg(long, value_name = "OS_ARCH")]
    platform: Vec<String>,
}

impl Select {
    fn args(&self) -> terrapeak::airgap::SelectionArgs {
        terrapeak::airgap::SelectionArgs {
            lock_files: self.lock_file.clone(),
            roots: self.root.clone(),
            manifests: self.manifest.clone(),
            platforms: self.platform.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExportFormat {
    /// One tar file with a manifest, for `terrapeak import`.
    Bundle,
    /// Terraform's packed filesystem-mirror layout (zips only), for enclaves without TerraPeak.
    FilesystemMirror,
}

/// Threads for file reads and writes. Each stream of a cached file reads its next chunk on one;
/// with Tokio's default (512), 200 clients at once started about 140 threads, and their stacks
/// and allocator arenas were a third of the process's memory. Reads from the page cache take
/// tens of microseconds, so a few dozen threads keep up with any number of clients.
const BLOCKING_THREADS: usize = 32;

/// Time transfers in flight get to finish after SIGTERM or SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        addr: cli.addr.clone(),
        domain: cli.domain.clone(),
        data_dir: cli.data_dir.clone(),
        registry_url: cli.registry_url.clone(),
        log_level: cli.log_level.clone(),
        offline: cli.offline,
    };
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("terrapeak: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            if let Err(e) = terrapeak::server::check_files(&config) {
                eprintln!("terrapeak: configuration error: {e}");
                return ExitCode::from(2);
            }
            print!("{}", config.to_masked_yaml());
            ExitCode::SUCCESS
        }
        Command::ClientConfig { mode } => match terrapeak::client_config::render(&config, mode) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("terrapeak: configuration error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Healthcheck { url, timeout } => healthcheck(&config, url, timeout),
        Command::Warm {
            select,
            jobs,
            pin,
            json,
        } => run_command(
            &cli.log_level,
            terrapeak::commands::warm(config, select.args(), jobs, pin, json),
        ),
        Command::Export {
            select,
            all,
            out,
            path,
            format,
            compress,
            jobs,
            json,
        } => {
            let Some(out) = out.or(path) else {
                eprintln!("terrapeak export: say where to write: --out FILE");
                return ExitCode::from(2);
            };
            let mirror = format == ExportFormat::FilesystemMirror;
            run_command(
                &cli.log_level,
                terrapeak::commands::export(
                    config,
                    select.args(),
                    all,
                    out,
                    mirror,
                    compress,
                    jobs,
                    json,
                ),
            )
        }
        Command::Gc { dry_run, json } => run_command(
            &cli.log_level,
            terrapeak::commands::gc(config, dry_run, json),
        ),
        Command::Import { file, json } => run_command(
            &cli.log_level,
            terrapeak::commands::import(config, file, json),
        ),
        Command::Serve => serve(config),
    }
}

/// `terrapeak healthcheck`: one GET of /healthz on the local server.
fn healthcheck(config: &Config, url: Option<String>, timeout: Duration) -> ExitCode {
    let url = match url {
        Some(u) => u,
        None => match config.listen_addr() {
            Ok(mut addr) => {
                if addr.ip().is_unspecified() {
                    addr.set_ip(if addr.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    });
                }
                let scheme = if config.server.tls.cert_file.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{addr}/healthz")
            }
            Err(e) => {
                eprintln!("terrapeak: configuration error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("terrapeak: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let answer = runtime.block_on(async {
        // The local server's certificate names its public host, not 127.0.0.1: this asks only
        // whether our own process answers, so the certificate is not checked.
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .danger_accept_invalid_certs(true)
            .build()?;
        client.get(&url).send().await
    });
    match answer {
        Ok(resp) if resp.status().is_success() => ExitCode::SUCCESS,
        Ok(resp) => {
            eprintln!("terrapeak: {url} answered {}", resp.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("terrapeak: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stdout in buffered batches (see `terrapeak::log_writer`); the guard flushes what
/// is left at exit.
fn init_logging(config: &Config) -> log_writer::FlushGuard<std::io::Stdout> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = log_writer::buffered(std::io::stdout());
    use std::io::IsTerminal;
    let format = config.log.format.resolve(std::io::stdout().is_terminal());
    if format == LogFormat::Json {
        log_writer::set_json_access_sink(writer.line_sink());
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json | LogFormat::Auto => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
    guard
}

/// Runs a command (warm, export, import) on a runtime of its own, logging warnings (or
/// `--log-level`) as text on stderr, so its report on stdout stays clean.
fn run_command(
    level: &Option<String>,
    work: impl std::future::Future<Output = ExitCode>,
) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_new(level.as_deref().unwrap_or("warn"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt.block_on(work),
        Err(e) => {
            eprintln!("terrapeak: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> ExitCode {
    let _log_guard = init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("terrapeak: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let server = match Server::start(&config).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "TerraPeak could not start");
                eprintln!("terrapeak: {e}");
                return ExitCode::FAILURE;
            }
        };
        let trimmer = tokio::spawn(terrapeak::memory::release_periodically());
        let stopped = server.run_until_signalled(SHUTDOWN_GRACE).await;
        trimmer.abort();
        match stopped {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server stopped with an error");
                ExitCode::FAILURE
            }
        }
    })
}
