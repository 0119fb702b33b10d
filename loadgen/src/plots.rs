//! The plots of `ferry-loadgen report`, drawn with plotters as SVG: the
//! figures a bench measured reach the report as JSON (a bench run with
//! `--figures PATH` writes them there), so each bench stays a separate
//! process and the report draws only what was measured in its run.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// min, median, max of one figure over the runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let (min, median, max) = crate::compare_bench::spread(values);
        Spread { min, median, max }
    }
}

/// One export's figures for one job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bar {
    pub export: String,
    pub mibs: Spread,
    pub iops: Spread,
    pub p99_ms: Spread,
}

/// What `compare` measured, for the plots.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CompareFigures {
    /// Per job (its name), every export's figures.
    pub jobs: Vec<(String, Vec<Bar>)>,
    /// The 4 KiB random job's name and, per Ferry run, the RPO sampled
    /// while its writer ran: (seconds since it started, RPO in seconds).
    pub rpo_job: String,
    pub rpo: Vec<Vec<(f64, f64)>>,
}

/// What `processor-bench` measured, for the plots: after each point of
/// the 4 KiB random run, (MiB written, MiB of replica data on disk).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SpaceFigures {
    pub space: Vec<(f64, f64)>,
}

/// Writes `figures` as JSON to `path`.
pub fn save<T: Serialize>(path: &Path, figures: &T) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(figures)?)?;
    Ok(())
}

/// Reads what [`save`] wrote.
pub fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

const COLORS: [RGBColor; 4] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0xc4, 0x4e, 0x52),
];

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("draw the plot: {e}")
}

/// One panel of bars (median) with min–max whiskers, one bar per export.
fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    bars: &[(String, Spread)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let top = bars.iter().map(|(_, s)| s.max).fold(0.0, f64::max) * 1.15;
    let top = if top > 0.0 { top } else { 1.0 };
    let names: Vec<String> = bars.iter().map(|(n, _)| n.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        // The integer range's end is a segment of its own: one less.
        .build_cartesian_2d(
            (0..bars.len().saturating_sub(1)).into_segmented(),
            0f64..top,
        )
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(unit)
        .y_label_formatter(&|v| {
            if top >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, s))| {
            let color = COLORS[i % COLORS.len()];
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), s.median),
                ],
                color.filled(),
            );
            bar.set_margin(0, 0, 12, 12);
            bar
        }))
        .map_err(plot_err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, s))| {
            ErrorBar::new_vertical(
                SegmentValue::CenterOf(i),
                s.min,
                s.median,
                s.max,
                BLACK.stroke_width(1),
                8,
            )
        }))
        .map_err(plot_err)?;
    Ok(())
}

/// Short names for the exports on the x axis.
fn short(export: &str) -> String {
    if export.starts_with("qemu-nbd") {
        "qemu-nbd".into()
    } else if export.starts_with("qemu-storage-daemon") {
        "QEMU mirror".into()
    } else if export.starts_with("Ferry") {
        "Ferry".into()
    } else {
        export.into()
    }
}

/// `throughput.svg`: per job, MiB/s (sequential) or IOPS (random) and p99
/// latency of every export.
pub fn throughput(path: &Path, figures: &CompareFigures) -> Result<()> {
    let panels = figures.jobs.len() * 2;
    let root = SVGBackend::new(path, (420 * panels.max(1) as u32, 360)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let areas = root.split_evenly((1, panels.max(1)));
    for (j, (job, exports)) in figures.jobs.iter().enumerate() {
        let random = job.starts_with("4 KiB");
        let rate: Vec<(String, Spread)> = exports
            .iter()
            .map(|b| (short(&b.export), if random { b.iops } else { b.mibs }))
            .collect();
        let p99: Vec<(String, Spread)> = exports
            .iter()
            .map(|b| (short(&b.export), b.p99_ms))
            .collect();
        let (what, unit) = if random {
            ("IOPS", "writes/s")
        } else {
            ("MiB/s", "MiB/s")
        };
        bars(&areas[2 * j], &format!("{job}: {what}"), unit, &rate)?;
        bars(
            &areas[2 * j + 1],
            &format!("{job}: p99 latency"),
            "ms",
            &p99,
        )?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// `rpo.svg`: the RPO of each Ferry run over the time its 4 KiB random
/// writer ran.
pub fn rpo(path: &Path, figures: &CompareFigures) -> Result<()> {
    let root = SVGBackend::new(path, (840, 360)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let samples = figures.rpo.iter().flatten();
    let t_max = samples.clone().map(|s| s.0).fold(1.0, f64::max);
    let y_max = samples.map(|s| s.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("RPO while {} (1 s points)", figures.rpo_job),
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the writer started")
        .y_desc("RPO, s (now - newest write in a point)")
        .draw()
        .map_err(plot_err)?;
    for (run, series) in figures.rpo.iter().enumerate() {
        let color = COLORS[run % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                series.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(format!("run {}", run + 1))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// `space.svg`: the replica's bytes on disk against the bytes written, with
/// the 1× and 1.5× lines.
pub fn space(path: &Path, figures: &SpaceFigures) -> Result<()> {
    let root = SVGBackend::new(path, (840, 360)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let x_max = figures.space.iter().map(|s| s.0).fold(1.0, f64::max);
    let y_max = figures
        .space
        .iter()
        .map(|s| s.1)
        .fold(x_max * 1.5, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "processor-svc: replica data on disk, 4 KiB random writes",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("MiB written")
        .y_desc("MiB on disk")
        .draw()
        .map_err(plot_err)?;
    for (label, factor, color) in [("1x written", 1.0, BLACK), ("1.5x (target)", 1.5, RED)] {
        chart
            .draw_series(LineSeries::new(
                [(0.0, 0.0), (x_max, x_max * factor)],
                color.stroke_width(1),
            ))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    let color = COLORS[0];
    chart
        .draw_series(LineSeries::new(
            std::iter::once((0.0, 0.0)).chain(figures.space.iter().copied()),
            color.stroke_width(2),
        ))
        .map_err(plot_err)?
        .label("replica")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    chart
        .draw_series(
            figures
                .space
                .iter()
                .map(|p| Circle::new(*p, 3, color.filled())),
        )
        .map_err(plot_err)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(m: f64) -> Spread {
        Spread {
            min: m * 0.9,
            median: m,
            max: m * 1.1,
        }
    }

    #[test]
    fn every_plot_is_drawn_from_its_figures() {
        let dir = tempfile::tempdir().unwrap();
        let exports = |a: f64| {
            [
                "qemu-nbd writeback",
                "qemu-storage-daemon + mirror",
                "Ferry (agent)",
            ]
            .iter()
            .enumerate()
            .map(|(i, e)| Bar {
                export: e.to_string(),
                mibs: spread(a / (i + 1) as f64),
                iops: spread(a * 256.0 / (i + 1) as f64),
                p99_ms: spread(1.5 * (i + 1) as f64),
            })
            .collect::<Vec<_>>()
        };
        let compare = CompareFigures {
            jobs: vec![
                ("1 MiB sequential writes".into(), exports(1000.0)),
                ("4 KiB random writes".into(), exports(120.0)),
            ],
            rpo_job: "4 KiB random writes".into(),
            rpo: vec![(0..40)
                .map(|i| (i as f64 * 0.25, 0.5 + (i % 4) as f64 * 0.2))
                .collect()],
        };
        let saved = dir.path().join("compare.json");
        save(&saved, &compare).unwrap();
        let compare: CompareFigures = load(&saved).unwrap();
        let space_figures = SpaceFigures {
            space: (1..=8)
                .map(|i| (i as f64 * 19.5, i as f64 * 19.6))
                .collect(),
        };
        throughput(&dir.path().join("t.svg"), &compare).unwrap();
        rpo(&dir.path().join("r.svg"), &compare).unwrap();
        space(&dir.path().join("s.svg"), &space_figures).unwrap();
        let t = std::fs::read_to_string(dir.path().join("t.svg")).unwrap();
        // Every export is named on the axis, and both jobs have a panel.
        for label in [
            "qemu-nbd",
            "QEMU mirror",
            "Ferry",
            "IOPS",
            "MiB/s",
            "p99 latency",
        ] {
            assert!(
                t.contains(label),
                "{label} missing from the throughput plot"
            );
        }
        let r = std::fs::read_to_string(dir.path().join("r.svg")).unwrap();
        assert!(r.contains("run 1") && r.contains("<polyline"), "{r}");
        let s = std::fs::read_to_string(dir.path().join("s.svg")).unwrap();
        assert!(s.contains("1.5x (target)") && s.contains("<circle"), "{s}");
    }
}
