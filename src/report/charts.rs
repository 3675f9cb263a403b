//! The report's charts, drawn with `plotters` into SVG files (text stays `<text>` elements, so
//! no font is loaded). Each function draws one file and returns `Ok(None)`, or
//! `Ok(Some(why))` without writing anything when the run holds no data for it.

use super::{RunData, accuracy_scale, benchmarks};
use anyhow::Result;
use plotters::prelude::*;
use std::path::Path;

const CAPTION: (&str, u32) = ("sans-serif", 22);
const LABELS: (&str, u32) = ("sans-serif", 14);

fn color(i: usize) -> RGBAColor {
    Palette99::pick(i).to_rgba()
}

/// `(lo, hi)` over the finite values, widened when empty or flat, with a margin.
fn padded(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.into_iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.05
    } else {
        lo.abs().max(1e-12) * 0.1
    };
    (lo - pad, hi + pad)
}

/// Short labels for values of any size (learning rates are ~1e-6).
fn axis_number(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e4).contains(&a) {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// Loss, margin, mean w and learning rate over the optimizer steps of all rounds (2x2 panels),
/// one colour per round.
pub fn training(data: &RunData, path: &Path) -> Result<Option<String>> {
    let rounds: Vec<_> = data
        .rounds
        .iter()
        .filter(|r| !r.metrics.is_empty())
        .collect();
    if rounds.is_empty() {
        return Ok(Some("no round-N/metrics.jsonl with steps".into()));
    }
    // Global step numbers: the rounds' steps one after another.
    let mut series = Vec::new();
    let mut offset = 0usize;
    for r in &rounds {
        let steps: Vec<(f64, &super::StepLine)> = r
            .metrics
            .iter()
            .enumerate()
            .map(|(i, m)| ((offset + i + 1) as f64, m))
            .collect();
        offset += r.metrics.len();
        series.push((r.round, steps));
    }
    let total = offset as f64;
    let root = SVGBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    type Field = fn(&super::StepLine) -> f64;
    let panels: [(&str, Field); 4] = [
        ("loss", |m| m.loss),
        ("margin (chosen - rejected reward)", |m| m.margin),
        ("mean ACO weight w", |m| m.w_mean),
        ("learning rate", |m| m.lr),
    ];
    for (area, (name, get)) in root.split_evenly((2, 2)).iter().zip(panels) {
        let (lo, hi) = padded(
            series
                .iter()
                .flat_map(|(_, s)| s.iter().map(|(_, m)| get(m))),
        );
        let mut chart = ChartBuilder::on(area)
            .caption(name, CAPTION)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..total + 1.0, lo..hi)?;
        chart
            .configure_mesh()
            .x_desc("optimizer step (all rounds)")
            .y_desc(name)
            .label_style(LABELS)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| axis_number(*v))
            .draw()?;
        for (i, (round, steps)) in series.iter().enumerate() {
            let c = color(i);
            let points: Vec<(f64, f64)> = steps
                .iter()
                .map(|(x, m)| (*x, get(m)))
                .filter(|(_, y)| y.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(points, c.stroke_width(2)))?
                .label(format!("round {round}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .label_font(LABELS)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(None)
}

/// Accuracy per round (0 = before training) per benchmark, with the 95% interval as error bars.
pub fn accuracy(data: &RunData, path: &Path) -> Result<Option<String>> {
    let Some(rows) = data.eval.as_ref() else {
        return Ok(Some("no eval.jsonl in the run folder".into()));
    };
    if rows.is_empty() {
        return Ok(Some("eval.jsonl is empty".into()));
    }
    let scale = accuracy_scale(rows);
    let names = benchmarks(rows);
    let last_round = rows.iter().map(|r| r.round).max().unwrap_or(0) as f64;
    let (lo, hi) = padded(
        rows.iter()
            .flat_map(|r| [r.ci_low * scale, r.ci_high * scale, r.accuracy * scale]),
    );
    let lo = lo.max(0.0);
    let hi = hi.min(100.0f64.max(lo + 1.0)).max(lo + 1.0);
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("accuracy per round (95% interval)", CAPTION)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..last_round + 0.5, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("round (0 = before training)")
        .y_desc("accuracy (%)")
        .label_style(LABELS)
        .x_labels((last_round as usize + 2).min(30))
        .x_label_formatter(&|v| {
            if (v - v.round()).abs() < 1e-6 && *v >= 0.0 {
                format!("{v:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    let spread = 0.25 / names.len().max(1) as f64;
    for (i, name) in names.iter().enumerate() {
        let c = color(i);
        let shift = (i as f64 - (names.len() - 1) as f64 / 2.0) * spread;
        let mut mine: Vec<_> = rows.iter().filter(|r| &r.benchmark == name).collect();
        mine.sort_by_key(|r| r.round);
        let points: Vec<(f64, f64)> = mine
            .iter()
            .map(|r| (r.round as f64 + shift, r.accuracy * scale))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(mine.iter().map(|r| {
            ErrorBar::new_vertical(
                r.round as f64 + shift,
                r.ci_low * scale,
                r.accuracy * scale,
                r.ci_high * scale,
                c.stroke_width(2),
                10,
            )
        }))?;
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .label_font(LABELS)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(None)
}

/// Histogram of every candidate's foresight score f, per round (share of the round's
/// candidates per bin, bars overlaid).
pub fn foresight(data: &RunData, path: &Path) -> Result<Option<String>> {
    let rounds: Vec<(usize, Vec<f64>)> = data
        .rounds
        .iter()
        .map(|r| {
            let f: Vec<f64> = r.f.iter().copied().filter(|x| x.is_finite()).collect();
            (r.round, f)
        })
        .filter(|(_, f)| !f.is_empty())
        .collect();
    if rounds.is_empty() {
        return Ok(Some(
            "no foresight scores (round-N/trajectories.jsonl absent or without candidates)".into(),
        ));
    }
    let (lo, hi) = padded(rounds.iter().flat_map(|(_, f)| f.iter().copied()));
    const BINS: usize = 30;
    let width = (hi - lo) / BINS as f64;
    let hists: Vec<(usize, Vec<f64>)> = rounds
        .iter()
        .map(|(round, f)| {
            let mut counts = vec![0.0; BINS];
            for &x in f {
                let b = (((x - lo) / width) as usize).min(BINS - 1);
                counts[b] += 1.0;
            }
            let n = f.len() as f64;
            (*round, counts.into_iter().map(|c| c / n).collect())
        })
        .collect();
    let top = hists
        .iter()
        .flat_map(|(_, h)| h.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("foresight scores f of the candidates, per round", CAPTION)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(lo..hi, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("foresight score f (mean rollout log-prob)")
        .y_desc("share of the round's candidates")
        .label_style(LABELS)
        .x_label_formatter(&|v| axis_number(*v))
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()?;
    for (i, (round, h)) in hists.iter().enumerate() {
        let c = color(i);
        let n = rounds[i].1.len();
        chart
            .draw_series(
                h.iter()
                    .enumerate()
                    .filter(|(_, v)| **v > 0.0)
                    .map(|(b, v)| {
                        let x0 = lo + b as f64 * width;
                        Rectangle::new([(x0, 0.0), (x0 + width, *v)], c.mix(0.35).filled())
                    }),
            )?
            .label(format!("round {round} ({n} candidates)"))
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.mix(0.35).filled())
            });
        chart.draw_series(
            h.iter()
                .enumerate()
                .filter(|(_, v)| **v > 0.0)
                .map(|(b, v)| {
                    let x0 = lo + b as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, *v)], c.stroke_width(1))
                }),
        )?;
    }
    chart
        .configure_series_labels()
        .label_font(LABELS)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(None)
}

/// Tokens/s of the sample, reference and train phases per round (grouped bars).
pub fn throughput(data: &RunData, path: &Path) -> Result<Option<String>> {
    type Rate = fn(&super::RoundData) -> Option<f64>;
    let phases: [(&str, Rate); 3] = [
        ("sample", |r| {
            r.summary.as_ref().and_then(|s| s.sample_rate())
        }),
        ("reference", |r| {
            r.summary.as_ref().and_then(|s| s.reference_rate())
        }),
        ("train", |r| r.train_rate()),
    ];
    let rates: Vec<Vec<Option<f64>>> = phases
        .iter()
        .map(|(_, get)| data.rounds.iter().map(get).collect())
        .collect();
    let top = rates
        .iter()
        .flatten()
        .flatten()
        .fold(0.0f64, |a, b| a.max(*b));
    if top <= 0.0 || !top.is_finite() {
        return Ok(Some(
            "no phase tokens and seconds (summary.json absent, and no metrics.jsonl)".into(),
        ));
    }
    let n = data.rounds.len();
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("throughput per phase and round", CAPTION)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..top * 1.15)?;
    let names: Vec<usize> = data.rounds.iter().map(|r| r.round).collect();
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("tokens/s")
        .label_style(LABELS)
        .disable_x_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&|v| {
            let i = v.round();
            if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                format!("round {}", names[i as usize])
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| axis_number(*v))
        .draw()?;
    let bar = 0.8 / phases.len() as f64;
    for (p, ((name, _), rates)) in phases.iter().zip(&rates).enumerate() {
        let c = color(p);
        let x_of = move |i: usize| i as f64 - 0.4 + p as f64 * bar;
        chart
            .draw_series(rates.iter().enumerate().filter_map(|(i, r)| {
                r.filter(|v| v.is_finite()).map(|v| {
                    Rectangle::new(
                        [(x_of(i) + 0.01, 0.0), (x_of(i) + bar - 0.01, v)],
                        c.filled(),
                    )
                })
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .label_font(LABELS)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(None)
}
