//! Operators, precedence, literals and the `Null` rules.

use super::*;
use crate::duration::{DAY_MS, HOUR_MS, MINUTE_MS, MONTH_MS, YEAR_MS};

#[test]
fn arithmetic_and_precedence() {
    assert_eq!(run("1 + 2 * 3", &[]), num(7.0));
    assert_eq!(run("(1 + 2) * 3", &[]), num(9.0));
    assert_eq!(run("2 - 3 - 4", &[]), num(-5.0));
    assert_eq!(run("8 / 2 / 2", &[]), num(2.0));
    assert_eq!(run("10 / 4", &[]), num(2.5));
    assert_eq!(run("7 % 3 + 1", &[]), num(2.0));
    assert_eq!(run("-7 % 3", &[]), num(-1.0));
    assert_eq!(run("-x * 2", &[("x", num(3.0))]), num(-6.0));
    assert_eq!(run("- -x", &[("x", num(3.0))]), num(3.0));
    assert_eq!(run("2 * -x", &[("x", num(3.0))]), num(-6.0));
    assert_eq!(run("1 - -1", &[]), num(2.0));
}

#[test]
fn boolean_precedence() {
    assert_eq!(run("true or false and false", &[]), Val::Bool(true));
    assert_eq!(run("false and true or true", &[]), Val::Bool(true));
    assert_eq!(run("not true or true", &[]), Val::Bool(true));
    assert_eq!(run("not (true or true)", &[]), Val::Bool(false));
    assert_eq!(run("not x > 1", &[("x", num(2.0))]), Val::Bool(false));
    assert_eq!(run("not not vip", &[("vip", Val::Bool(true))]), Val::Bool(true));
    assert_eq!(run("x + 1 > 2 * 1 and s == \"a\"", &[("x", num(2.0)), ("s", text("a"))]), Val::Bool(true));
    assert_eq!(run("(1 < 2) == true", &[]), Val::Bool(true));
}

#[test]
fn comparisons_of_every_type() {
    let cases = [
        ("3 == 3", true),
        ("3 != 3", false),
        ("2 < 3", true),
        ("3 <= 3", true),
        ("3 > 3", false),
        ("3 >= 3", true),
        ("\"apple\" < \"banana\"", true),
        ("\"b\" >= \"ab\"", true),
        ("\"a\" == \"a\"", true),
        ("true == true", true),
        ("true != false", true),
        ("vip == false", false),
    ];
    for (src, want) in cases {
        assert_eq!(run(src, &[("vip", Val::Bool(true))]), Val::Bool(want), "{src}");
    }
}

#[test]
fn in_lists() {
    assert_eq!(run("x in (1, 2, 3)", &[("x", num(2.0))]), Val::Bool(true));
    assert_eq!(run("x in (1, 2, 3)", &[("x", num(4.0))]), Val::Bool(false));
    assert_eq!(run("x in (-1, 0)", &[("x", num(-1.0))]), Val::Bool(true));
    assert_eq!(run("x in (1d, 2d)", &[("x", num(DAY_MS as f64))]), Val::Bool(true));
    assert_eq!(run("s in (\"a\", \"b\")", &[("s", text("b"))]), Val::Bool(true));
    assert_eq!(run("s not in (\"a\", \"b\")", &[("s", text("c"))]), Val::Bool(true));
    assert_eq!(run("s not in (\"a\", \"b\")", &[("s", text("a"))]), Val::Bool(false));
    assert_eq!(run("x + 1 in (3)", &[("x", num(2.0))]), Val::Bool(true));
    assert_eq!(run("not x in (3)", &[("x", num(2.0))]), Val::Bool(true));
}

#[test]
fn case_takes_the_first_true_branch() {
    let src = "case when x > 10 then \"big\" when x > 5 then \"mid\" else \"small\" end";
    assert_eq!(run(src, &[("x", num(11.0))]), text("big"));
    assert_eq!(run(src, &[("x", num(6.0))]), text("mid"));
    assert_eq!(run(src, &[("x", num(1.0))]), text("small"));
    assert_eq!(run("case when x > 10 then 1 end", &[("x", num(1.0))]), Val::Null);
    assert_eq!(run("case when x > 10 then 1 when true then null end", &[("x", num(1.0))]), Val::Null);
    assert_eq!(run("case when vip then 1 else 2 end + 1", &[]), num(3.0));
}

#[test]
fn literals() {
    assert_eq!(run(r#""a\"b\\c""#, &[]), text("a\"b\\c"));
    assert_eq!(run("\"\"", &[]), text(""));
    assert_eq!(run("0.7", &[]), num(0.7));
    assert_eq!(run("now", &[]), num(NOW as f64));
    assert_eq!(run("true", &[]), Val::Bool(true));
    let units = [
        ("500ms", 500),
        ("30s", 30_000),
        ("15m", 15 * MINUTE_MS),
        ("12h", 12 * HOUR_MS),
        ("7d", 7 * DAY_MS),
        ("2w", 14 * DAY_MS),
        ("13mo", 13 * MONTH_MS),
        ("1y", YEAR_MS),
    ];
    for (src, ms) in units {
        assert_eq!(run(src, &[]), num(ms as f64), "{src}");
    }
}

#[test]
fn null_propagates_through_arithmetic_and_functions() {
    for src in
        ["x + 1", "1 - x", "x * 2", "x / 2", "x % 2", "-x", "abs(x)", "days(x)", "min(x, 1)", "band(x, 1)"]
    {
        assert_eq!(run(src, &[]), Val::Null, "{src}");
    }
    assert_eq!(run("top(m)", &[]), Val::Null);
    assert_eq!(run("size(difference(tags, other))", &[("tags", set(&["a"]))]), Val::Null);
}

#[test]
fn null_is_false_in_comparisons_and_boolean_positions() {
    let cases = [
        ("x > 1", false),
        ("x <= 1", false),
        ("x == x", false),
        ("x != 1", false),
        ("x in (1)", false),
        ("x not in (1)", false),
        ("not (x > 1)", true),
        ("not vip", true),
        ("vip and true", false),
        ("vip or true", true),
        ("if(vip, false, true)", true),
        ("case when vip then false else true end", true),
        ("is_null(x)", true),
        ("is_null(vip)", true),
    ];
    for (src, want) in cases {
        assert_eq!(run(src, &[]), Val::Bool(want), "{src}");
    }
    assert_eq!(run("vip", &[]), Val::Null);
}

#[test]
fn division_by_zero_and_overflow_are_null() {
    let zero = [("x", num(1.0)), ("y", num(0.0))];
    assert_eq!(run("x / y", &zero), Val::Null);
    assert_eq!(run("x % y", &zero), Val::Null);
    assert_eq!(run("coalesce(x / y, -1)", &zero), num(-1.0));
    assert_eq!(run("x / y > 0", &zero), Val::Bool(false));
    assert_eq!(run("x * x", &[("x", num(1e200))]), Val::Null);
    assert_eq!(run("x + x", &[("x", num(f64::MAX))]), Val::Null);
}

#[test]
fn bad_slot_values_read_as_null() {
    for bad in [num(f64::NAN), num(f64::INFINITY), text("3"), Val::Bool(true), set(&["a"])] {
        assert_eq!(run("is_null(x)", &[("x", bad.clone())]), Val::Bool(true), "{bad:?}");
    }
    let short: Vec<Val> = Vec::new();
    assert_eq!(compiled("coalesce(x, 2)").eval(&short, NOW, &mut None), num(2.0));
}

#[test]
fn compiled_reports_type_slots_and_now() {
    let c = compiled("x > 1 and (y < x or now - t > 1d) and s == \"a\"");
    assert_eq!(c.ty(), Type::Bool);
    let (x, y, t, s) = (resolve("x"), resolve("y"), resolve("t"), resolve("s"));
    let mut want: Vec<usize> = [x, y, t, s].iter().map(|r| r.map(|(i, _)| i).unwrap_or(0)).collect();
    want.sort();
    assert_eq!(c.slots(), want.as_slice());
    assert!(c.uses_now());
    let c = compiled("top(m)");
    assert_eq!(c.ty(), Type::Str);
    assert!(!c.uses_now());
    assert_eq!(compiled("keys(m)").ty(), Type::Set);
    assert_eq!(compiled("m").ty(), Type::Map);
    assert_eq!(compiled("coalesce(null, x)").ty(), Type::Num);
    assert_eq!(compiled("case when vip then null else \"a\" end").ty(), Type::Str);
}

#[test]
fn whitespace_and_newlines_are_insignificant() {
    assert_eq!(run("  x\n\t>\r\n 1  ", &[("x", num(2.0))]), Val::Bool(true));
}
