//! The definition of correct for incremental features and tags: for random
//! event streams (shuffled times, late events, duplicates, events expired on
//! arrival, entries of random size, ticks at random moments) and a random
//! read clock, every incrementally maintained feature and tag equals a
//! straightforward batch recomputation from the full event list.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use portrait_server::duration::DAY_MS;
use portrait_server::engine::expr::Val;
use portrait_server::engine::feature::{typed, value_key};
use portrait_server::engine::state::{Dirty, UserState};
use portrait_server::engine::{check_schema, Engine};
use portrait_server::model::{Attrs, Event, Value};
use portrait_server::schema::Aggregation;
use proptest::prelude::*;

const T0: i64 = 1_767_225_600_000; // 2026-01-01

const SCHEMA: &str = r#"
[families.registration]
ttl = "none"
attrs = { channel = "str" }
[families.browse]
ttl = "90d"
[families.trade]
ttl = "730d"

[features.orders]
family = "trade"
agg = "count"
where = 'type == "order"'
[features.first_order]
family = "trade"
agg = "first_time"
where = 'type == "order"'
[features.last_order]
family = "trade"
agg = "last_time"
where = 'type == "order"'
[features.orders_first_30d]
family = "trade"
agg = "count"
window = "30d"
anchor = "first"
where = 'type == "order"'
[features.spend_60d]
family = "trade"
agg = "sum"
attr = "amount"
window = "60d"
where = 'type == "order" and amount >= 10'
[features.min_amount_60d]
family = "trade"
agg = "min"
attr = "amount"
window = "60d"
[features.max_amount_lifetime]
family = "trade"
agg = "max"
attr = "amount"
[features.avg_amount_20d]
family = "trade"
agg = "avg"
attr = "amount"
window = "20d"
[features.views_7d]
family = "browse"
agg = "count"
window = "7d"
[features.cats_7d]
family = "browse"
agg = "top_k"
attr = "category"
window = "7d"
[features.order_cats_7d]
family = "trade"
agg = "top_k"
attr = "category"
window = "7d"
where = 'type == "order"'
[features.distinct_cats_30d]
family = "browse"
agg = "distinct_count"
attr = "category"
window = "30d"
[features.last_cat]
family = "browse"
agg = "last_value"
attr = "category"
window = "3d"

[tags.lifecycle]
rule = 'case when orders == 0 then "prospect" when now - last_order > 40d then "churned" when now - first_order < 60d then "new" else "loyal" end'
[tags.churn_risk]
rule = 'orders > 0 and now - last_order > 10d'
[tags.recency]
rule = 'if(is_null(last_order), 0, 6 - band(days(now - last_order), 2, 5, 10, 30))'
[tags.coupon]
rule = 'size(difference(keys_at_least(cats_7d, 3), keys(order_cats_7d))) > 0'
[tags.busy]
rule = 'views_7d >= 4 and coupon'
[tags.top_cat]
rule = 'top(cats_7d)'
[tags.fast_buyer]
rule = 'orders_first_30d >= 3'
[tags.big]
rule = 'coalesce(spend_60d, 0) + 0 >= 300 or max_amount_lifetime >= 450'
[tags.app]
rule = 'registration.channel == "app"'
"#;

#[derive(Debug, Clone)]
struct Step {
    /// Events in this entry.
    events: Vec<Event>,
    /// Advance of the logical clock before the entry, ms.
    advance: i64,
    /// Run a tick after the entry.
    tick: bool,
}

fn arb_event() -> impl Strategy<Value = Event> {
    let user = 0..3u8;
    let family = prop_oneof![3 => Just("browse"), 3 => Just("trade"), 1 => Just("registration")];
    let age = 0..120 * DAY_MS; // some browse events are expired on arrival
    let id = 0..40u8;
    let category = prop::sample::select(vec!["phone", "tv", "shoes", "books"]);
    let amount = prop_oneof![Just(None), (0..600i64).prop_map(Some)];
    let kind = prop::sample::select(vec!["order", "order", "refund", "view"]);
    let channel = prop::sample::select(vec!["app", "web"]);
    (user, family, age, id, category, amount, kind, channel).prop_map(
        |(user, family, age, id, category, amount, kind, channel)| {
            let mut attrs = Attrs::new();
            match family {
                "registration" => {
                    attrs.insert("channel".into(), Value::Str(channel.into()));
                }
                _ => {
                    attrs.insert("category".into(), Value::Str(category.into()));
                    if let Some(a) = amount {
                        attrs.insert("amount".into(), Value::Int(a));
                    }
                }
            }
            Event {
                user_id: format!("u{user}"),
                family: family.into(),
                event_type: if family == "trade" { kind.into() } else { "view".into() },
                time_ms: T0 - age,
                event_id: format!("e{id}"),
                attrs,
            }
        },
    )
}

fn arb_steps() -> impl Strategy<Value = Vec<Step>> {
    let step = (prop::collection::vec(arb_event(), 0..6), 0..3 * DAY_MS, any::<bool>())
        .prop_map(|(events, advance, tick)| Step { events, advance, tick });
    prop::collection::vec(step, 1..25)
}

/// The incremental path, as the state machine drives it.
struct Incremental {
    states: BTreeMap<String, UserState>,
    seen: BTreeSet<(String, String)>,
    /// Accepted (non-duplicate) events in apply order.
    accepted: Vec<Event>,
}

impl Incremental {
    fn run(engine: &Engine, steps: &[Step]) -> (Incremental, i64) {
        let mut inc = Incremental { states: BTreeMap::new(), seen: BTreeSet::new(), accepted: Vec::new() };
        let mut clock = T0;
        for step in steps {
            clock += step.advance;
            let mut dirty: HashMap<String, Dirty> = HashMap::new();
            for e in &step.events {
                if !inc.seen.insert((e.user_id.clone(), e.event_id.clone())) {
                    continue; // duplicate
                }
                inc.accepted.push(e.clone());
                let state = inc.states.entry(e.user_id.clone()).or_default();
                engine.observe(state, e, clock, dirty.entry(e.user_id.clone()).or_default());
            }
            for (user, d) in dirty {
                engine.settle(inc.states.get_mut(&user).unwrap(), &d, clock);
            }
            if step.tick {
                for state in inc.states.values_mut() {
                    if state.wake_at.is_some_and(|w| w <= clock) {
                        engine.settle(state, &Dirty::new(), clock);
                    }
                }
            }
        }
        (inc, clock)
    }
}

/// Batch recomputation of one feature from the accepted events.
fn batch_feature(engine: &Engine, i: usize, events: &[&Event], now: i64) -> Val {
    let f = &engine.features[i];
    let matching: Vec<&Event> = events.iter().copied().filter(|e| f.wants(e)).collect();
    if f.spec.anchor_first {
        let Some(first) = matching.iter().map(|e| e.time_ms).min() else { return Val::Num(0.0) };
        let end = first + f.spec.window_ms.unwrap();
        return Val::Num(matching.iter().filter(|e| e.time_ms < end).count() as f64);
    }
    let inside: Vec<&Event> =
        matching.into_iter().filter(|e| f.window.is_none_or(|w| w.contains(e.time_ms, now))).collect();
    let attr = |e: &Event| f.spec.attr.as_ref().and_then(|a| e.attrs.get(a)).cloned();
    let nums: Vec<f64> = inside
        .iter()
        .filter_map(|e| match attr(e) {
            Some(Value::Int(i)) => Some(i as f64),
            Some(Value::Float(x)) => Some(x),
            _ => None,
        })
        .collect();
    let num_or_null = |x: Option<f64>| x.map_or(Val::Null, Val::Num);
    match f.spec.agg {
        Aggregation::Count => Val::Num(inside.len() as f64),
        Aggregation::Sum => Val::Num(nums.iter().sum()),
        Aggregation::Avg => {
            num_or_null((!nums.is_empty()).then(|| nums.iter().sum::<f64>() / nums.len() as f64))
        }
        Aggregation::Min => num_or_null(nums.iter().copied().reduce(f64::min)),
        Aggregation::Max => num_or_null(nums.iter().copied().reduce(f64::max)),
        Aggregation::FirstTime => num_or_null(inside.iter().map(|e| e.time_ms as f64).reduce(f64::min)),
        Aggregation::LastTime => num_or_null(inside.iter().map(|e| e.time_ms as f64).reduce(f64::max)),
        Aggregation::DistinctCount => Val::Num(
            inside.iter().filter_map(|e| attr(e)).map(|v| value_key(&v)).collect::<BTreeSet<_>>().len()
                as f64,
        ),
        Aggregation::TopK => {
            let mut m = BTreeMap::new();
            for v in inside.iter().filter_map(|e| attr(e)) {
                *m.entry(value_key(&v)).or_insert(0.0) += 1.0;
            }
            Val::Map(m)
        }
        Aggregation::LastValue => {
            // Latest event time wins; ties go to the later applied event.
            let mut best: Option<(i64, Value)> = None;
            for e in &inside {
                if let Some(v) = attr(e) {
                    if best.as_ref().is_none_or(|(t, _)| e.time_ms >= *t) {
                        best = Some((e.time_ms, v));
                    }
                }
            }
            best.map_or(Val::Null, |(_, v)| typed(&v, f.spec.value_type))
        }
    }
}

/// Batch evaluation of every tag from batch features.
fn batch_tags(engine: &Engine, features: &[Val], events: &[&Event], now: i64) -> BTreeMap<String, Val> {
    let n = engine.features.len() + engine.tags.len() + engine.attrs.len();
    let mut slots = vec![Val::Null; n];
    slots[..features.len()].clone_from_slice(features);
    let attr_base = engine.features.len() + engine.tags.len();
    for (i, a) in engine.attrs.iter().enumerate() {
        let mut best: Option<(i64, Value)> = None;
        for e in events.iter().filter(|e| e.family == a.family) {
            if let Some(v) = e.attrs.get(&a.attr) {
                if best.as_ref().is_none_or(|(t, _)| e.time_ms >= *t) {
                    best = Some((e.time_ms, v.clone()));
                }
            }
        }
        slots[attr_base + i] = best.map_or(Val::Null, |(_, v)| typed(&v, a.ty));
    }
    let mut out = BTreeMap::new();
    for tag in &engine.tags {
        let v = tag.rule.eval(&slots, now, &mut None);
        slots[tag.slot] = v.clone();
        out.insert(tag.name.clone(), v);
    }
    out
}

fn close(a: &Val, b: &Val) -> bool {
    match (a, b) {
        (Val::Num(x), Val::Num(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => a == b,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_batch(steps in arb_steps(), read_after in 0..50 * DAY_MS) {
        let (_, engine) = check_schema(SCHEMA).unwrap();
        let (inc, clock) = Incremental::run(&engine, &steps);
        let now = clock + read_after;
        for (user, state) in &inc.states {
            let events: Vec<&Event> = inc.accepted.iter().filter(|e| &e.user_id == user).collect();
            let (features, tags) = engine.read(state, now);
            let expected: Vec<Val> = (0..engine.features.len()).map(|i| batch_feature(&engine, i, &events, now)).collect();
            for (i, f) in engine.features.iter().enumerate() {
                prop_assert!(close(&features[&f.name], &expected[i]), "{user} feature {} at {now}: incremental {:?} batch {:?}", f.name, features[&f.name], expected[i]);
            }
            let expected_tags = batch_tags(&engine, &expected, &events, now);
            for (name, v) in &expected_tags {
                let got = &tags[name].value;
                prop_assert!(close(got, v), "{user} tag {name} at {now}: incremental {got:?} batch {v:?}");
            }
        }
    }
}

#[test]
fn a_time_driven_tag_flips_at_its_scheduled_moment() {
    let (_, engine) = check_schema(SCHEMA).unwrap();
    let mut state = UserState::default();
    let order = Event {
        user_id: "u".into(),
        family: "trade".into(),
        event_type: "order".into(),
        time_ms: T0,
        event_id: "o1".into(),
        attrs: Attrs::from([("amount".into(), Value::Int(50))]),
    };
    let mut dirty = Dirty::new();
    engine.observe(&mut state, &order, T0, &mut dirty);
    engine.settle(&mut state, &dirty, T0);
    let churn_risk = |state: &UserState| engine.tag_state(state, "churn_risk").cloned().unwrap();
    assert_eq!(churn_risk(&state).value, Val::Bool(false));
    // churn_risk: now - last_order > 10d flips 1 ms after T0 + 10d.
    let flip = T0 + 10 * DAY_MS + 1;
    assert!(state.wake_at.unwrap() <= flip, "wake {:?} after the flip {flip}", state.wake_at);
    while let Some(w) = state.wake_at.filter(|w| *w <= flip) {
        engine.settle(&mut state, &Dirty::new(), w);
    }
    assert_eq!(churn_risk(&state).value, Val::Bool(true));
    assert_eq!(churn_risk(&state).changed_at, flip);
}
