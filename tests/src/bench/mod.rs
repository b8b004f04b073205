//! `outpost-bench`: benchmarks of a real central and agent(s) started on temp dirs (see
//! BENCHMARKS.md). Scenarios return [`Figure`]s; the binary prints them as a table and JSON.

use serde::Serialize;

pub mod hist;
pub mod load;
pub mod peers;
pub mod scenarios;
pub mod store;
pub mod sys;

/// One measured figure of a scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// What was measured, e.g. `read.c64.req_per_s`.
    pub name: String,
    pub value: f64,
    /// Unit of `value`, e.g. `req/s`, `µs`, `ms`, `s`, `MiB`.
    pub unit: String,
    /// The goal in words, e.g. `>= 60000`; `None` for context figures.
    pub goal: Option<String>,
    /// Free-form context (conditions, fsync latency at the time, caveats).
    pub note: Option<String>,
}

impl Figure {
    pub fn new(name: impl Into<String>, value: f64, unit: impl Into<String>) -> Figure {
        Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            goal: None,
            note: None,
        }
    }

    /// Sets the goal (`">= 60000"`, `"<= 1.5"`: a comparison and a number in `unit`).
    pub fn goal(mut self, goal: impl Into<String>) -> Figure {
        self.goal = Some(goal.into());
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = Some(note.into());
        self
    }

    /// Whether the goal is met: `None` without a goal or with one not of the form `>= x`/`<= x`.
    pub fn met(&self) -> Option<bool> {
        let g = self.goal.as_deref()?.trim();
        let (op, rest) = g.split_at(g.find(|c: char| c.is_ascii_digit() || c == '.')?);
        let x: f64 = rest
            .split_whitespace()
            .next()?
            .replace(',', "")
            .parse()
            .ok()?;
        match op.trim() {
            ">=" | "≥" => Some(self.value >= x),
            "<=" | "≤" => Some(self.value <= x),
            _ => None,
        }
    }
}
