//! Apply-path cost per event, in-process (no gRPC, no raft): the state
//! machine applying entries of 100 events on real RocksDB, with a
//! families-only schema (baseline) and with the demo schema (features and
//! tags on), and the engine's share split into features (`observe`) and
//! tags (`settle`). Part of `make bench`.

use std::time::Instant;

use clap::Parser;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload};
use portrait_server::engine::check_schema;
use portrait_server::engine::state::{Dirty, UserState};
use portrait_server::model::{Attrs, Event, Value};
use portrait_server::schema::DEFAULT_SCHEMA_TOML;
use portrait_server::store::{GroupState, StateMachine};
use portrait_server::types::{Command, Entry, LogId};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    /// Rounds of every measure, interleaved; the table shows medians and the
    /// range (the tag share is taken per round: both of its parts are timed
    /// in the same minute).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The smallest and largest of a measure's rounds.
fn range(values: &[f64]) -> (f64, f64) {
    values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(*v), h.max(*v)))
}

/// `median (min – max)` of a measure's rounds.
fn spread(values: &[f64]) -> String {
    let (lo, hi) = range(values);
    if values.len() == 1 {
        return format!("{:.0}", values[0]);
    }
    format!("{:.0} ({lo:.0} – {hi:.0})", median(values))
}

const FAMILIES_ONLY: &str = "[families.registration]\nttl = \"none\"\nhistory = 5\n[families.browse]\nttl = \"90d\"\nhistory = 50\n[families.trade]\nttl = \"730d\"\nhistory = 100\n[families.contact]\nttl = \"30d\"\nhistory = 50\n";

fn events(n: usize, users: usize, now: i64) -> Vec<Event> {
    let cats = ["phone", "laptop", "tv", "shoes", "books", "toys", "food", "beauty"];
    (0..n)
        .map(|i| {
            let family = match i % 20 {
                0 | 1 => "trade",
                2 => "contact",
                _ => "browse",
            };
            let mut attrs = Attrs::new();
            attrs.insert("category".into(), Value::Str(cats[i % cats.len()].into()));
            attrs.insert("amount".into(), Value::Float((i % 5000) as f64 / 10.0));
            attrs.insert("page".into(), Value::Int((i % 37) as i64));
            Event {
                user_id: format!("user-{}", (i * 7919) % users),
                family: family.into(),
                event_type: if family == "trade" { "order".into() } else { "view".into() },
                time_ms: now - (i % 86_400) as i64 * 1000,
                event_id: format!("e{i}"),
                attrs,
            }
        })
        .collect()
}

async fn state_machine_ns_per_event(schema: &str, evs: &[Event], now: i64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = GroupState::open(dir.path()).unwrap();
    let mut sm = StateMachine::new(store, dir.path()).unwrap();
    let log = |i: u64| LogId::new(CommittedLeaderId::new(1, 1), i);
    let schema_entry = Entry {
        log_id: log(1),
        payload: EntryPayload::Normal(Command::ApplySchema {
            stamp_ms: now,
            toml: schema.into(),
            version: 1,
        }),
    };
    sm.apply(vec![schema_entry]).await.unwrap();
    let entries: Vec<Entry> = evs
        .chunks(100)
        .enumerate()
        .map(|(i, c)| Entry {
            log_id: log(i as u64 + 2),
            payload: EntryPayload::Normal(Command::Write {
                stamp_ms: now + i as i64,
                requests: vec![c.to_vec()].into(),
            }),
        })
        .collect();
    let start = Instant::now();
    for e in entries {
        sm.apply(vec![e]).await.unwrap();
    }
    sm.applied_state().await.unwrap(); // the last batch is written
    start.elapsed().as_nanos() as f64 / evs.len() as f64
}

fn engine_ns_per_event(evs: &[Event], now: i64) -> (f64, f64) {
    let (_, engine) = check_schema(DEFAULT_SCHEMA_TOML).unwrap();
    let mut states: std::collections::HashMap<&str, UserState> = Default::default();
    let (mut observe, mut settle) = (0u128, 0u128);
    for (i, chunk) in evs.chunks(100).enumerate() {
        let clock = now + i as i64;
        let mut dirty: std::collections::HashMap<&str, Dirty> = Default::default();
        // As apply does: a user's state is aligned once per entry, then
        // observed per event and settled once.
        let t = Instant::now();
        for e in chunk {
            let state = states.entry(&e.user_id).or_default();
            let d = dirty.entry(&e.user_id).or_insert_with(|| {
                engine.align(state);
                Dirty::new()
            });
            engine.observe_aligned(state, e, clock, d);
        }
        observe += t.elapsed().as_nanos();
        let t = Instant::now();
        for (user, d) in dirty {
            engine.settle_aligned(states.get_mut(user).unwrap(), &d, clock, portrait_core::rules::NEWEST);
        }
        settle += t.elapsed().as_nanos();
    }
    (observe as f64 / evs.len() as f64, settle as f64 / evs.len() as f64)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let now = portrait_server::wall_clock_ms();
    let evs = events(args.events, args.users, now);
    let rounds = args.rounds.max(1);
    let (mut base, mut demo, mut observe, mut settle, mut share) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        base.push(state_machine_ns_per_event(FAMILIES_ONLY, &evs, now).await);
        let d = state_machine_ns_per_event(DEFAULT_SCHEMA_TOML, &evs, now).await;
        let (o, s) = engine_ns_per_event(&evs, now);
        demo.push(d);
        observe.push(o);
        settle.push(s);
        share.push(100.0 * s / d);
    }
    println!(
        "Apply cost per event: {} events over {} users, entries of 100 events, RocksDB on a temp dir; \
         median (min – max) of {rounds} interleaved rounds",
        args.events, args.users
    );
    println!("| {:<56} | {:>24} |", "measure", "ns/event");
    println!("|{:-<58}|{:-<26}|", "", "");
    println!("| {:<56} | {:>24} |", "state machine apply, families only (baseline)", spread(&base));
    println!("| {:<56} | {:>24} |", "state machine apply, demo schema (16 features, 11 tags)", spread(&demo));
    println!("| {:<56} | {:>24} |", "  engine: features (observe), in memory", spread(&observe));
    println!("| {:<56} | {:>24} |", "  engine: tags (settle), in memory", spread(&settle));
    let (lo, hi) = range(&share);
    println!("tag computation share of demo apply: {:.1} % (rounds: {lo:.1} – {hi:.1} %)", median(&share));
}
