//! The `warm`, `export`, `import` and `gc` commands: their reports and exit statuses.

use crate::airgap::export::{self, Compression};
use crate::airgap::progress::Progress;
use crate::airgap::warm::{self, Outcome};
use crate::airgap::{SelectionArgs, import};
use crate::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status when the inputs or the configuration are wrong.
const USAGE: u8 = 2;

fn print_json(report: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(report).expect("serializes")
    );
}

fn fail(what: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("terrapeak {what}: {e}");
    ExitCode::FAILURE
}

/// `terrapeak warm`: exit 0 when every item is in the store, 1 when any failed.
pub async fn warm(
    config: Config,
    select: SelectionArgs,
    jobs: usize,
    pin: bool,
    json: bool,
) -> ExitCode {
    if select.is_empty() {
        eprintln!("terrapeak warm: name what to warm: --lock-file, --root or --manifest");
        return ExitCode::from(USAGE);
    }
    let selection = match select.read() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("terrapeak warm: {e}");
            return ExitCode::from(USAGE);
        }
    };
    let cache = match crate::airgap::open(&config).await {
        Ok(c) => c,
        Err(e) => return fail("warm", e),
    };
    let progress = Progress::new(!json);
    let report = warm::warm(&cache, selection, warm::Options { jobs, pin }, &progress).await;
    progress.finish();
    cache.storage().discard_spool().await;
    print_warm(&report, json);
    if report.failed() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_warm(report: &warm::WarmReport, json: bool) {
    if json {
        print_json(&report);
        return;
    }
    for item in &report.items {
        let outcome = match item.outcome {
            Outcome::Fetched => "fetched",
            Outcome::Present => "present",
            Outcome::Failed => "FAILED ",
        };
        match &item.error {
            Some(e) => println!("{outcome} {} {}: {e}", item.kind, item.item),
            None => println!(
                "{outcome} {} {}{}",
                item.kind,
                item.item,
                if item.pinned { " (pinned)" } else { "" }
            ),
        }
    }
    let count = |o| report.items.iter().filter(|i| i.outcome == o).count();
    println!(
        "{} fetched, {} already present, {} failed",
        count(Outcome::Fetched),
        count(Outcome::Present),
        count(Outcome::Failed)
    );
}

/// `terrapeak export`: the selection (warmed first if it is not stored yet) or `--all`.
#[allow(clippy::too_many_arguments)]
pub async fn export(
    config: Config,
    select: SelectionArgs,
    all: bool,
    out: PathBuf,
    filesystem_mirror: bool,
    compression: Compression,
    jobs: usize,
    json: bool,
) -> ExitCode {
    if all != select.is_empty() {
        eprintln!(
            "terrapeak export: name what to export (--lock-file, --root, --manifest) or --all"
        );
        return ExitCode::from(USAGE);
    }
    let selection = if all {
        None
    } else {
        match select.read() {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("terrapeak export: {e}");
                return ExitCode::from(USAGE);
            }
        }
    };
    let cache = match crate::airgap::open(&config).await {
        Ok(c) => c,
        Err(e) => return fail("export", e),
    };
    let keys = match selection {
        None => match crate::airgap::everything(&cache).await {
            Ok(k) => k,
            Err(e) => return fail("export", e),
        },
        Some(selection) => {
            let progress = Progress::new(!json);
            let report = warm::warm(
                &cache,
                selection,
                warm::Options { jobs, pin: false },
                &progress,
            )
            .await;
            progress.finish();
            if report.failed() > 0 {
                print_warm(&report, json);
                cache.storage().discard_spool().await;
                return fail(
                    "export",
                    format!(
                        "{} item(s) could not be brought into the store; no bundle was written",
                        report.failed()
                    ),
                );
            }
            report.keys.into_iter().collect()
        }
    };
    let written = if filesystem_mirror {
        export::write_filesystem_mirror(cache.storage(), &keys, &out).await
    } else {
        export::write_bundle(cache.storage(), keys, &out, compression).await
    };
    cache.storage().discard_spool().await;
    match written {
        Ok(report) => {
            if json {
                print_json(&report);
            } else {
                println!(
                    "exported {} object(s), {} bytes, from {} to {}",
                    report.objects,
                    report.bytes,
                    report.source_hosts.join(", "),
                    out.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("export", e),
    }
}

/// `terrapeak import FILE`.
pub async fn import(config: Config, file: PathBuf, json: bool) -> ExitCode {
    let cache = match crate::airgap::open(&config).await {
        Ok(c) => c,
        Err(e) => return fail("import", e),
    };
    let result = import::import_bundle(cache.storage(), &file).await;
    cache.storage().discard_spool().await;
    match result {
        Ok(report) => {
            if json {
                print_json(&report);
            } else {
                println!(
                    "imported {} object(s) ({} bytes), {} already present, from {}",
                    report.imported,
                    report.bytes,
                    report.already_present,
                    report.source_hosts.join(", ")
                );
                for key in &report.kept_existing {
                    println!("kept the stored copy of {key}: the bundle holds other bytes");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("import", e),
    }
}

/// `terrapeak gc [--dry-run]`: one eviction pass with the configured limits. Explicit, so it
/// also runs on a sealed TerraPeak.
pub async fn gc(config: Config, dry_run: bool, json: bool) -> ExitCode {
    let limits = crate::inventory::Limits {
        max_size: config.storage.max_size,
        unused_after: config.cache.evict_unused_after,
    };
    let cache = match crate::airgap::open(&config).await {
        Ok(c) => c,
        Err(e) => return fail("gc", e),
    };
    let result = cache.gc(limits, dry_run, true).await;
    cache.storage().discard_spool().await;
    let report = match result {
        Ok(r) => r,
        Err(e) => return fail("gc", e),
    };
    if json {
        print_json(&report);
        return ExitCode::SUCCESS;
    }
    if limits.max_size.is_none() && limits.unused_after.is_none() {
        println!(
            "no limit is configured (storage.max_size, cache.evict_unused_after): nothing to evict"
        );
    }
    let verb = if dry_run { "would evict" } else { "evicted" };
    for e in &report.evicted {
        println!(
            "{verb} {} ({} bytes, {})",
            e.unit.label(),
            e.bytes,
            e.reason.as_str()
        );
    }
    println!(
        "{verb} {} unit(s), {} bytes; the store holds {} bytes in {} object(s){}",
        report.evicted.len(),
        report.evicted.iter().map(|e| e.bytes).sum::<u64>(),
        report.stored_bytes_after,
        report.objects_after,
        if dry_run { " (unchanged: dry run)" } else { "" }
    );
    ExitCode::SUCCESS
}
