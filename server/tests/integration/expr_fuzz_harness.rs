//! Runs the fuzz harness of the tag-rule language (`server/fuzz`) on its
//! seed corpus, and on seeds combined with generated clocks and slot values,
//! so every test run builds and exercises what `make fuzz` runs for hours.

mod expr {
    pub use portrait_server::engine::expr::*;
}

#[allow(dead_code)]
#[path = "../../fuzz/src/harness.rs"]
mod harness;

use harness::{run, Outcome, CATALOG};

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/expr");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    seeds
}

#[test]
fn every_seed_rule_compiles_and_evaluates() {
    let seeds = seeds();
    assert!(seeds.len() >= 8, "seed corpus has {} files", seeds.len());
    for (name, text) in &seeds {
        assert!(matches!(run(text), Outcome::Evaluated { .. }), "seed {name} does not compile");
    }
}

/// Seeds under many clocks and slot values (the binary input layout), plus
/// truncated and byte-flipped texts: no property fails, and the inputs do
/// reach evaluation and next-change computation.
#[test]
fn seeds_with_generated_clocks_and_slots_hold_every_property() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut evaluated, mut changes, mut rejected) = (0, 0, 0);
    for (_, text) in seeds() {
        for round in 0..300 {
            let now = match round % 4 {
                0 => 1_700_000_000_000 + (next() % 1_000_000_000) as i64,
                1 => next() as i64,
                2 => -((next() % 10_000_000_000) as i64),
                _ => [i64::MIN, i64::MAX, 0, 1 << 53][round % 7 % 4],
            };
            // A first byte of 0 marks the binary layout (and is `now`'s low byte).
            let mut input = vec![0u8];
            input.extend_from_slice(&now.to_le_bytes()[1..]);
            for _ in 0..CATALOG.len() {
                input.extend_from_slice(&next().to_le_bytes()[..2]);
            }
            let mut text = text.clone();
            match round % 5 {
                3 => text.truncate(next() as usize % (text.len() + 1)),
                4 if !text.is_empty() => {
                    let i = next() as usize % text.len();
                    text[i] = next() as u8;
                }
                _ => {}
            }
            input.extend_from_slice(&text);
            match run(&input) {
                Outcome::Rejected => rejected += 1,
                Outcome::Evaluated { changes: c } => {
                    evaluated += 1;
                    changes += c as usize;
                }
            }
        }
    }
    assert!(evaluated > 1000 && rejected > 100, "evaluated {evaluated}, rejected {rejected}");
    assert!(changes > 100, "only {changes} evaluations had a next change");
}
