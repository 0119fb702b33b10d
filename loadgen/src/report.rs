//! `ferry-loadgen report`: runs the benchmarks the performance targets are
//! measured by, each as a child process of this binary (so one cannot warm
//! or starve the next), and writes their figures into one Markdown page
//! (`docs/performance.md` by default) with the machine and the date, and
//! its plots as SVG beside it (`docs/performance/`): throughput and p99
//! against the peers, RPO over time under 4 KiB random writes, replica
//! bytes on disk against bytes written.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::plots;

/// One bench: its title, what it measures, and its subcommand.
struct Bench {
    title: &'static str,
    about: &'static str,
    args: Vec<String>,
    /// Its output is a Markdown table already.
    markdown: bool,
    /// The plots drawn from the figures it wrote (`--figures`).
    plots: Plots,
}

#[derive(Clone, Copy, PartialEq)]
enum Plots {
    None,
    /// `throughput.svg` and `rpo.svg`.
    Compare,
    /// `space.svg`.
    Space,
}

fn benches(dir: &Path, runs: usize, random_secs: u64) -> Vec<Bench> {
    let dir = dir.display().to_string();
    vec![
        Bench {
            title: "The NBD path against its peers",
            about: "fio (nbd engine) against qemu-nbd --cache=writeback on a raw image \
                    (no replication: the ceiling of the capture path), against \
                    qemu-storage-daemon exporting the image with an active blockdev-mirror \
                    (copy-mode=write-blocking) to a second qemu-nbd (QEMU's own replication), \
                    and against ferry-agent's export with registry-svc, cache-svc and \
                    processor-svc as processes and a point every second. Ratios are of \
                    medians against qemu-nbd. \"Writer stopped → in a point\": from fio's \
                    exit to the newest recovery point holding a write made right after its \
                    last one (read back through ReadDisk).",
            args: vec![
                "compare".into(),
                format!("--dir={dir}"),
                format!("--runs={runs}"),
                format!("--random-secs={random_secs}"),
            ],
            markdown: true,
            plots: Plots::Compare,
        },
        Bench {
            title: "processor-svc: apply rate, replica space, point cost, RPO lag",
            about: "The library path: records applied to a replica and made durable, beside \
                    the same run's fsynced 1 MiB sequential writes; the replica's bytes on \
                    disk after 40,000 random 4 KiB writes; the cost of cutting a point; the \
                    RPO lag through the whole stack at a steady churn.",
            args: vec!["processor-bench".into(), format!("--dir={dir}")],
            markdown: false,
            plots: Plots::Space,
        },
        Bench {
            title: "The control plane",
            about: "registry-svc's unary GetVm against the same server's grpc.health Check, \
                    16 concurrent callers on one channel, authenticated as an operator.",
            args: vec!["control-bench".into(), format!("--dir={dir}")],
            markdown: true,
            plots: Plots::None,
        },
        Bench {
            title: "Failover against cp",
            about: "An unplanned failover of a 1 GiB disk half written, beside \
                    `cp --sparse=always` of the same source image in the same run.",
            args: vec!["failover-bench".into(), format!("--dir={dir}")],
            markdown: false,
            plots: Plots::None,
        },
    ]
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib >> 20);
    let qemu = Command::new("qemu-nbd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    format!("{cpus} CPUs ({model}), {memory} GiB memory; {qemu}")
}

pub fn run(dir: &Path, out: &Path, runs: usize, random_secs: u64) -> Result<()> {
    let me = std::env::current_exe().context("this binary's path")?;
    let mut page = String::new();
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    writeln!(page, "# Performance\n")?;
    writeln!(
        page,
        "Written by `ferry-loadgen report` (release build) on {when}: {}. \
         Every figure comes from this one run; ratios are against a baseline or a \
         peer measured in the same run, since these machines are noisy. No figure \
         here is asserted by a test. How they were found, and what they mean \
         for each target: [performance-analysis.md](performance-analysis.md).\n",
        machine()
    )?;
    // The plots go beside the page, in a directory named after it.
    let plot_dir = out.with_extension("");
    std::fs::create_dir_all(&plot_dir).with_context(|| format!("create {}", plot_dir.display()))?;
    let plot_link = plot_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let figures = dir.join("figures.json");
    for bench in benches(dir, runs, random_secs) {
        // What the bench before wrote is on disk first: its write-back
        // would otherwise slow this one's fsyncs (failover-bench's took
        // twice as long right after compare).
        let synced = Command::new("sync").status().context("run sync")?;
        if !synced.success() {
            bail!("sync failed: {synced}");
        }
        eprintln!("==> ferry-loadgen {}", bench.args.join(" "));
        let mut command = Command::new(&me);
        command.args(&bench.args);
        if bench.plots != Plots::None {
            command.arg(format!("--figures={}", figures.display()));
        }
        let output = command
            .output()
            .with_context(|| format!("run ferry-loadgen {}", bench.args[0]))?;
        if !output.status.success() {
            bail!(
                "ferry-loadgen {} failed: {}",
                bench.args[0],
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // Paths relative to where it ran: the page is checked in.
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        if let Ok(cwd) = std::env::current_dir() {
            text = text.replace(&format!("{}/", cwd.display()), "");
        }
        writeln!(page, "## {}\n\n{}\n", bench.title, bench.about)?;
        writeln!(page, "`ferry-loadgen {}`\n", bench.args.join(" "))?;
        if bench.markdown {
            writeln!(page, "{}", text.trim_end())?;
        } else {
            writeln!(page, "```\n{}\n```", text.trim_end())?;
        }
        writeln!(page)?;
        let drawn: Vec<(&str, &str)> = match bench.plots {
            Plots::None => vec![],
            Plots::Compare => {
                let f: plots::CompareFigures = plots::load(&figures)?;
                plots::throughput(&plot_dir.join("throughput.svg"), &f)?;
                plots::rpo(&plot_dir.join("rpo.svg"), &f)?;
                vec![
                    (
                        "throughput.svg",
                        "Throughput and p99 latency against the peers",
                    ),
                    ("rpo.svg", "RPO over time under steady 4 KiB random writes"),
                ]
            }
            Plots::Space => {
                let f: plots::SpaceFigures = plots::load(&figures)?;
                plots::space(&plot_dir.join("space.svg"), &f)?;
                vec![("space.svg", "Replica bytes on disk against bytes written")]
            }
        };
        for (file, alt) in drawn {
            writeln!(page, "![{alt}]({plot_link}/{file})\n")?;
        }
    }
    std::fs::write(out, page).with_context(|| format!("write {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}
