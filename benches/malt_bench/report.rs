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

/// One row per figure: what, malt, floor, malt ÷ floor, peers, malt ÷
/// each peer, goal.
pub(crate) struct Table {
    pub(crate) rows: Vec<[String; 7]>,
    /// The last row's malt timing, for its peers' ratios.
    pub(crate) last_malt: Option<Stats>,
}

impl Table {
    pub(crate) fn new() -> Table {
        Table {
            rows: Vec::new(),
            last_malt: None,
        }
    }
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
            String::new(),
            String::new(),
            goal.into(),
        ]);
        self.last_malt = Some(malt);
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
        self.rows.push([
            what.into(),
            value,
            floor,
            ratio,
            String::new(),
            String::new(),
            goal.into(),
        ]);
        self.last_malt = None;
    }

    /// Adds a peer's timing to the last row (a timing): malt ÷ peer.
    pub(crate) fn peer(&mut self, label: &str, peer: Stats) {
        let ratio = match self.last_malt {
            Some(malt) => format!(
                "{:.2}×",
                malt.median.as_secs_f64() / peer.median.as_secs_f64()
            ),
            None => "—".into(),
        };
        self.peer_figure(
            format!("{label} {} (p99 {})", fmt(peer.median), fmt(peer.p99)),
            ratio,
        );
    }

    /// Adds a peer's figure and malt's ratio to it to the last row.
    pub(crate) fn peer_figure(&mut self, text: String, ratio: String) {
        eprintln!("    peer: {text}: {ratio}");
        let row = self.rows.last_mut().expect("a row before its peers");
        for (cell, add) in [(4, text), (5, ratio)] {
            if !row[cell].is_empty() {
                row[cell].push_str("; ");
            }
            row[cell].push_str(&add);
        }
    }

    pub(crate) fn print(&self) {
        println!(
            "| measure | malt median (p99) | floor median (p99) | malt ÷ floor | peers median (p99) | malt ÷ peer | goal |"
        );
        println!("|---|---|---|---|---|---|---|");
        for r in &self.rows {
            let cell = |i: usize| {
                if r[i].is_empty() {
                    "—"
                } else {
                    r[i].as_str()
                }
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                r[0],
                r[1],
                r[2],
                r[3],
                cell(4),
                cell(5),
                r[6]
            );
        }
    }
}
