//! Statistics and the markdown table.

use super::*;

#[derive(Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) median: Duration,
    pub(crate) p99: Duration,
}

pub(crate) fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        median: at(0.5),
        p99: at(0.99),
    }
}

pub(crate) fn fmt(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    if ns < 10_000.0 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 10_000_000.0 {
        format!("{:.1} µs", ns / 1e3)
    } else if ns < 10e9 {
        format!("{:.1} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

pub(crate) struct Table {
    pub(crate) rows: Vec<[String; 5]>,
}

impl Table {
    pub(crate) fn timing(&mut self, what: &str, malt: Stats, floor: Option<Stats>, goal: &str) {
        let (floor_text, ratio) = match floor {
            Some(f) => (
                format!("{} (p99 {})", fmt(f.median), fmt(f.p99)),
                format!("{:.1}×", malt.median.as_secs_f64() / f.median.as_secs_f64()),
            ),
            None => ("—".into(), "—".into()),
        };
        self.rows.push([
            what.into(),
            format!("{} (p99 {})", fmt(malt.median), fmt(malt.p99)),
            floor_text,
            ratio,
            goal.into(),
        ]);
        eprintln!("  {what}: {}", self.rows.last().unwrap()[1]);
    }

    pub(crate) fn figure(
        &mut self,
        what: &str,
        value: String,
        floor: String,
        ratio: String,
        goal: &str,
    ) {
        eprintln!("  {what}: {value}");
        self.rows
            .push([what.into(), value, floor, ratio, goal.into()]);
    }

    pub(crate) fn print(&self) {
        println!("| measure | malt median (p99) | floor median (p99) | ratio | goal |");
        println!("|---|---|---|---|---|");
        for r in &self.rows {
            println!("| {} | {} | {} | {} | {} |", r[0], r[1], r[2], r[3], r[4]);
        }
    }
}
