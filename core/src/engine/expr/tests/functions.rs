//! Every built-in function.

use super::*;
use crate::duration::{DAY_MS, HOUR_MS};

#[test]
fn numeric_functions() {
    let cases = [
        ("abs(-3)", 3.0),
        ("abs(2.5)", 2.5),
        ("min(3, 1, 2)", 1.0),
        ("min(4, 5)", 4.0),
        ("max(3, 1, 2)", 3.0),
        ("max(-1, -2)", -1.0),
        ("days(36h)", 1.5),
        ("hours(90m)", 1.5),
        ("floor(2.7)", 2.0),
        ("floor(-2.5)", -3.0),
        ("ceil(2.1)", 3.0),
        ("ceil(-2.5)", -2.0),
        ("round(2.5)", 3.0),
        ("round(2.4)", 2.0),
        ("round(-2.6)", -3.0),
    ];
    for (src, want) in cases {
        assert_eq!(run(src, &[]), num(want), "{src}");
    }
    assert_eq!(run("days(x)", &[("x", num((3 * DAY_MS) as f64))]), num(3.0));
    assert_eq!(run("hours(x)", &[("x", num((5 * HOUR_MS) as f64))]), num(5.0));
}

#[test]
fn band_counts_thresholds_at_or_below() {
    let src = "band(x, 7, 30, 90, 180)";
    for (x, want) in
        [(-1.0, 1.0), (0.0, 1.0), (6.9, 1.0), (7.0, 2.0), (29.0, 2.0), (90.0, 4.0), (180.0, 5.0), (1e9, 5.0)]
    {
        assert_eq!(run(src, &[("x", num(x))]), num(want), "x = {x}");
    }
    assert_eq!(run("band(x, -10, 0)", &[("x", num(-5.0))]), num(2.0));
    assert_eq!(run("band(x, 1d, 1w)", &[("x", num((2 * DAY_MS) as f64))]), num(2.0));
    assert_eq!(run("band(x, 0)", &[("x", num(0.0))]), num(2.0));
}

#[test]
fn set_functions() {
    let values = [("tags", set(&["a", "b", "c"])), ("other", set(&["b", "d"]))];
    assert_eq!(run("difference(tags, other)", &values), set(&["a", "c"]));
    assert_eq!(run("union(tags, other)", &values), set(&["a", "b", "c", "d"]));
    assert_eq!(run("intersection(tags, other)", &values), set(&["b"]));
    assert_eq!(run("size(tags)", &values), num(3.0));
    assert_eq!(run("contains(tags, \"a\")", &values), Val::Bool(true));
    assert_eq!(run("contains(other, \"a\")", &values), Val::Bool(false));
    assert_eq!(run("size(difference(other, union(tags, other)))", &values), num(0.0));
}

#[test]
fn contains_and_get_find_a_long_value_under_the_key_it_is_counted_by() {
    use crate::engine::feature::value_key;
    use crate::model::Value;
    let long = format!("{}-category", "x".repeat(80));
    let key = value_key(&Value::Str(long.clone()));
    assert_ne!(key, long, "shortened");
    let values = [
        ("m", map(&[(key.as_str(), 3.0), ("short", 1.0)])),
        ("tags", set(&[key.as_str()])),
        ("s", text(&long)),
    ];
    assert_eq!(run("contains(m, s)", &values), Val::Bool(true));
    assert_eq!(run("get(m, s)", &values), num(3.0));
    assert_eq!(run("contains(tags, s)", &values), Val::Bool(true));
    assert_eq!(run("get(m, \"short\")", &values), num(1.0));
    let other = [("m", values[0].1.clone()), ("s", text(&format!("{}-other", "x".repeat(80))))];
    assert_eq!(run("contains(m, s)", &other), Val::Bool(false), "same prefix, another value");
}

#[test]
fn a_set_keeps_at_most_max_distinct_per_bucket_keys_the_smallest() {
    use crate::limits::MAX_DISTINCT_PER_BUCKET;
    let keys =
        |from: usize| (from..from + MAX_DISTINCT_PER_BUCKET).map(|i| format!("k{i:05}")).collect::<Vec<_>>();
    let (a, b) = (keys(0), keys(MAX_DISTINCT_PER_BUCKET));
    let as_set = |k: &[String]| set(&k.iter().map(String::as_str).collect::<Vec<_>>());
    let values = [("tags", as_set(&a)), ("other", as_set(&b))];
    assert_eq!(run("size(union(tags, other))", &values), num(MAX_DISTINCT_PER_BUCKET as f64));
    assert_eq!(run("union(other, tags)", &values), as_set(&a), "the smallest keys, whatever the order");
    assert_eq!(run("union(union(tags, other), other)", &values), as_set(&a));
}

#[test]
fn map_functions() {
    let values = [("m", map(&[("book", 1.0), ("phone", 3.0), ("shoe", 5.0)]))];
    assert_eq!(run("keys(m)", &values), set(&["book", "phone", "shoe"]));
    assert_eq!(run("keys_at_least(m, 3)", &values), set(&["phone", "shoe"]));
    assert_eq!(run("keys_at_least(m, 6)", &values), set(&[]));
    assert_eq!(run("size(m)", &values), num(3.0));
    assert_eq!(run("get(m, \"phone\")", &values), num(3.0));
    assert_eq!(run("get(m, \"car\")", &values), num(0.0));
    assert_eq!(run("contains(m, \"book\")", &values), Val::Bool(true));
    assert_eq!(run("top(m)", &values), text("shoe"));
}

#[test]
fn top_breaks_ties_by_smallest_key_and_is_null_when_empty() {
    assert_eq!(run("top(m)", &[("m", map(&[("b", 2.0), ("a", 2.0), ("c", 1.0)]))]), text("a"));
    assert_eq!(run("top(m)", &[("m", map(&[]))]), Val::Null);
    assert_eq!(run("top(m)", &[("m", map(&[("a", f64::NAN), ("b", 0.0)]))]), text("b"));
    assert_eq!(run("size(m)", &[("m", map(&[]))]), num(0.0));
}

#[test]
fn coalesce_is_null_and_if() {
    assert_eq!(run("coalesce(x, y, 3)", &[("y", num(2.0))]), num(2.0));
    assert_eq!(run("coalesce(x, y, 3)", &[]), num(3.0));
    assert_eq!(run("coalesce(x, null)", &[]), Val::Null);
    assert_eq!(run("coalesce(s, \"none\")", &[("s", text("a"))]), text("a"));
    assert_eq!(run("is_null(s)", &[("s", text("a"))]), Val::Bool(false));
    assert_eq!(run("is_null(tags)", &[]), Val::Bool(true));
    assert_eq!(run("is_null(null)", &[]), Val::Bool(true));
    assert_eq!(run("if(x > 1, \"hi\", \"lo\")", &[("x", num(2.0))]), text("hi"));
    assert_eq!(run("if(x > 1, \"hi\", \"lo\")", &[("x", num(0.0))]), text("lo"));
    assert_eq!(run("if(true, null, 1)", &[]), Val::Null);
    // Only the chosen branch is evaluated: a Null elsewhere does not matter.
    assert_eq!(run("if(true, 1, y + 1)", &[]), num(1.0));
}
