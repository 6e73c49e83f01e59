//! Every compile error, with its line, column and message, and the limits.

use super::*;

fn assert_error(src: &str, line: u32, col: u32, message: &str) {
    assert_eq!(error(src), (line, col, message.to_owned()), "{src}");
}

#[test]
fn type_errors() {
    assert_error(r#""a" + 1"#, 1, 5, "cannot apply `+` to Str and Num");
    assert_error("x * tags", 1, 3, "cannot apply `*` to Num and Set");
    assert_error("-\"a\"", 1, 2, "cannot apply `-` to Str");
    assert_error("not x", 1, 5, "cannot apply `not` to Num");
    assert_error("vip and x", 1, 9, "`and` needs Bool operands, found Num");
    assert_error("s or vip", 1, 1, "`or` needs Bool operands, found Str");
    assert_error("x == \"a\"", 1, 3, "cannot apply `==` to Num and Str");
    assert_error("vip < true", 1, 5, "cannot apply `<` to Bool and Bool");
    assert_error("tags == other", 1, 6, "cannot apply `==` to Set and Set");
    assert_error("m != m", 1, 3, "cannot apply `!=` to Map and Map");
    assert_error("x == null", 1, 3, "comparing with null is never true; test with `is_null(...)`");
    assert_error("x in (\"a\")", 1, 7, "`in` list items must be Num like the value, found Str");
    assert_error("tags in (\"a\")", 1, 1, "`in` needs a Num or Str value, found Set");
    assert_error("null", 1, 1, "expression is always null");
    assert_error("case when vip then null end", 1, 1, "expression is always null");
}

#[test]
fn function_errors() {
    assert_error("abs(\"a\")", 1, 5, "argument 1 of `abs` must be Num, found Str");
    assert_error("abs(1, 2)", 1, 1, "`abs` takes 1 argument, found 2");
    assert_error("get(m)", 1, 1, "`get` takes 2 arguments, found 1");
    assert_error("min(1)", 1, 1, "`min` takes at least 2 arguments, found 1");
    assert_error("foo(1)", 1, 1, "unknown function `foo`");
    assert_error("contains(x, \"a\")", 1, 10, "argument 1 of `contains` must be Set or Map, found Num");
    assert_error("get(m, 1)", 1, 8, "argument 2 of `get` must be Str, found Num");
    assert_error("if(x, 1, 2)", 1, 4, "argument 1 of `if` must be Bool, found Num");
    assert_error("if(vip, 1, \"a\")", 1, 12, "arguments of `if` have different types: Num and Str");
    assert_error("coalesce(x, s)", 1, 13, "arguments of `coalesce` have different types: Num and Str");
    assert_error("max(1, 2, vip)", 1, 11, "argument 3 of `max` must be Num, found Bool");
}

#[test]
fn band_errors() {
    assert_error("band(x)", 1, 1, "`band` takes a value and at least one threshold");
    assert_error("band(s, 1)", 1, 6, "argument 1 of `band` must be Num, found Str");
    assert_error("band(x, 3, 2)", 1, 12, "`band` thresholds must be ascending");
    assert_error("band(x, 1, 1)", 1, 12, "`band` thresholds must be ascending");
    assert_error("band(x, y)", 1, 9, "`band` thresholds must be number literals");
    assert_error("band(x, 1 + 1)", 1, 9, "`band` thresholds must be number literals");
}

#[test]
fn case_and_name_errors() {
    assert_error("case when x then 1 end", 1, 11, "`when` needs a Bool condition, found Num");
    assert_error(
        "case when vip then 1 else \"a\" end",
        1,
        27,
        "`case` branches have different types: Num and Str",
    );
    assert_error("nope > 1", 1, 1, "unknown name `nope`");
    assert_error("registration.country == \"x\"", 1, 1, "unknown name `registration.country`");
}

#[test]
fn division_by_a_literal_zero() {
    assert_error("x / 0", 1, 3, "division by zero");
    assert_error("x % 0.0", 1, 3, "division by zero");
    assert_error("x / -0", 1, 3, "division by zero");
}

#[test]
fn lexical_errors() {
    assert_error("\"abc", 1, 1, "unterminated string");
    assert_error(r#"s == "a\nb""#, 1, 8, r#"unknown escape `\n` in string (use \" or \\)"#);
    assert_error("x = 1", 1, 3, "unexpected `=`; compare with `==`");
    assert_error("!vip", 1, 1, "unexpected `!`; negate with `not`");
    assert_error("X > 1", 1, 1, "unexpected character `X` (names and keywords are lowercase)");
    assert_error("vip AND vip", 1, 5, "unexpected character `A` (names and keywords are lowercase)");
    assert_error("xY", 1, 2, "unexpected character `Y` (names and keywords are lowercase)");
    assert_error("x # 1", 1, 3, "unexpected character `#`");
    assert_error(
        "now - t > 30days",
        1,
        11,
        r#"invalid duration "30days": unknown unit "days" (use ms, s, m, h, d, w, mo, y)"#,
    );
    assert_error("1.5d", 1, 1, "a duration takes a whole number, e.g. `90d`");
    assert_error("1. + 2", 1, 3, "expected a digit after `.`");
    assert_error("a.b.c", 1, 1, "`a.b.`: a name has at most one dot");
    assert_error("registration. city", 1, 14, "expected a name after `registration.`");
    assert_error("99999999999999999y", 1, 1, r#"invalid duration "99999999999999999y": too large"#);
    assert_error(&"9".repeat(400), 1, 1, "number is too large");
}

#[test]
fn syntax_errors() {
    assert_error("", 1, 1, "expected an expression, found the end of the expression");
    assert_error("(x > 1", 1, 7, "expected `)`, found the end of the expression");
    assert_error("x >", 1, 4, "expected an expression, found the end of the expression");
    assert_error("x > 1 y", 1, 7, "expected an operator or the end of the expression, found `y`");
    assert_error("and", 1, 1, "expected an expression, found `and`");
    assert_error("abs(1 2)", 1, 7, "expected `,` or `)`, found a number");
    assert_error("1 < x < 3", 1, 7, "comparisons cannot be chained; combine them with `and`");
    assert_error("x == 1 in (1)", 1, 8, "comparisons cannot be chained; combine them with `and`");
    assert_error("x in y", 1, 6, "expected `(` after `in`, found `y`");
    assert_error(
        "x in (y)",
        1,
        7,
        "expected a literal (`in` lists hold numbers, strings, true or false), found `y`",
    );
    assert_error(
        "x in ()",
        1,
        7,
        "expected a literal (`in` lists hold numbers, strings, true or false), found `)`",
    );
    assert_error("case x end", 1, 6, "expected `when` after `case`, found `x`");
    assert_error(
        "case when vip then 1",
        1,
        21,
        "expected `when`, `else` or `end`, found the end of the expression",
    );
    assert_error("case when vip 1 end", 1, 15, "expected `then`, found a number");
    assert_error("case when vip then 1 else 2", 1, 28, "expected `end`, found the end of the expression");
    assert_error("x + )", 1, 5, "expected an expression, found `)`");
}

#[test]
fn errors_point_at_lines_and_columns() {
    let src = "orders_lifetime > 0\n  and now - last_order_time > 30d\n  and s + 1 > 2";
    assert_eq!(error(src), (3, 9, "cannot apply `+` to Str and Num".to_owned()));
    let e = compile(src, &resolve, &Limits::default()).err().map(|e| e.to_string());
    assert_eq!(e.as_deref(), Some("line 3, column 9: cannot apply `+` to Str and Num"));
    assert_error("\"ü\" + 1", 1, 5, "cannot apply `+` to Str and Num");
}

#[test]
fn limits() {
    let tight = Limits { max_len: 20, max_depth: 3, max_nodes: 7 };
    let err = |src: &str| compile(src, &resolve, &tight).err().map(|e| (e.line, e.col, e.message));
    let long = "x + 1 > 2 and vip or vip";
    assert_eq!(err(long), Some((1, 1, "expression is too long: 24 bytes (max_len 20)".to_owned())));
    assert_eq!(err("((((x))))"), Some((1, 4, "expression is nested too deeply (max_depth 3)".to_owned())));
    assert_eq!(err("-(-(-(-x)))"), Some((1, 4, "expression is nested too deeply (max_depth 3)".to_owned())));
    assert_eq!(err("1+1+1+1"), Some((1, 1, "expression is nested too deeply (max_depth 3)".to_owned())));
    let nodes = Some((1, 19, "expression has too many nodes (max_nodes 7)".to_owned()));
    assert_eq!(err("x in (1,2,3,4,5,6,7)"), nodes);
    assert!(compile("((x))", &resolve, &tight).is_ok());
    // An and/or chain is one level.
    let wide = Limits { max_len: 4096, max_depth: 3, max_nodes: 512 };
    assert!(compile("vip or vip or vip or vip or vip or vip", &resolve, &wide).is_ok());
    let defaults = Limits::default();
    assert_eq!((defaults.max_len, defaults.max_depth, defaults.max_nodes), (4096, 32, 512));
    let deep = format!("{}x{}", "(".repeat(100), ")".repeat(100));
    assert!(compile(&deep, &resolve, &defaults).unwrap_err().message.contains("max_depth 32"));
    let many = vec!["x"; 300].join(" + ");
    assert!(compile(&many, &resolve, &defaults).unwrap_err().message.contains("max_nodes 512"));
}
