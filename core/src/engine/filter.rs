//! Feature filters: a conjunction of comparisons on the event type and its
//! attributes, e.g. `type == "order" and amount >= 400 and category in
//! ("phone", "tv")`. A condition on a missing attribute, or one of another
//! type, is false.

use serde::{Deserialize, Serialize};

use crate::model::{Event, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Condition {
    name: String,
    op: Op,
    values: Vec<Value>,
}

/// A parsed filter.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Filter {
    conditions: Vec<Condition>,
}

impl Filter {
    /// Parses `cond and cond ...`; errors give the column (1-based).
    pub fn parse(text: &str) -> Result<Filter, String> {
        let mut p = Parser { text, pos: 0 };
        let mut conditions = vec![p.condition()?];
        loop {
            p.skip_ws();
            if p.pos == text.len() {
                return Ok(Filter { conditions });
            }
            p.keyword("and")?;
            conditions.push(p.condition()?);
        }
    }

    /// Whether `event` passes, by this build's newest apply rules.
    pub fn matches(&self, event: &Event) -> bool {
        self.matches_by(event, crate::rules::NEWEST)
    }

    /// [`Filter::matches`] by apply rules version `rules`.
    pub fn matches_by(&self, event: &Event, rules: u32) -> bool {
        let exact = rules >= crate::rules::EXACT_INTEGERS;
        self.conditions.iter().all(|c| c.matches(event, exact))
    }
}

impl Condition {
    fn matches(&self, event: &Event, exact: bool) -> bool {
        let owned;
        let value = if self.name == "type" {
            owned = Value::Str(event.event_type.clone());
            &owned
        } else {
            match event.attrs.get(&self.name) {
                Some(v) => v,
                None => return false,
            }
        };
        match self.op {
            Op::In => self.values.iter().any(|v| compare(value, v, exact) == Some(std::cmp::Ordering::Equal)),
            op => match compare(value, &self.values[0], exact) {
                None => op == Op::Ne && same_kind(value, &self.values[0]),
                Some(ord) => match op {
                    Op::Eq => ord.is_eq(),
                    Op::Ne => ord.is_ne(),
                    Op::Lt => ord.is_lt(),
                    Op::Le => ord.is_le(),
                    Op::Gt => ord.is_gt(),
                    Op::Ge => ord.is_ge(),
                    Op::In => unreachable!("handled above"),
                },
            },
        }
    }
}

fn same_kind(a: &Value, b: &Value) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// Numbers compare across int/float; strings and bools with their own kind.
/// `exact` (apply rules [`crate::rules::EXACT_INTEGERS`] on): an integer is
/// compared as it is, not rounded to a float first (above 2^53 neighbours
/// round to the same float, so `id == 9007199254740993` also matched
/// 9007199254740992).
fn compare(a: &Value, b: &Value, exact: bool) -> Option<std::cmp::Ordering> {
    let num = |v: &Value| match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    };
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Int(x), Value::Int(y)) if exact => Some(x.cmp(y)),
        (Value::Int(i), Value::Float(f)) if exact => int_to_float(*i, *f),
        (Value::Float(f), Value::Int(i)) if exact => int_to_float(*i, *f).map(std::cmp::Ordering::reverse),
        _ => num(a)?.partial_cmp(&num(b)?),
    }
}

/// `i` against `f` exactly (`None` for NaN).
fn int_to_float(i: i64, f: f64) -> Option<std::cmp::Ordering> {
    use std::cmp::Ordering;
    // 2^63: the first float above i64::MAX; -2^63 is i64::MIN exactly.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if f.is_nan() {
        return None;
    }
    if f >= TWO_63 {
        return Some(Ordering::Less);
    }
    if f < -TWO_63 {
        return Some(Ordering::Greater);
    }
    // In range, the integer part converts exactly; then the fraction
    // (exact too) decides a tie: f above its integer part is above i.
    let whole = f.trunc();
    match i.cmp(&(whole as i64)) {
        Ordering::Equal => 0.0_f64.partial_cmp(&(f - whole)),
        unequal => Some(unequal),
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn err<T>(&self, msg: &str) -> Result<T, String> {
        Err(format!("column {}: {msg}", self.pos + 1))
    }

    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.text.len() - trimmed.len();
    }

    fn keyword(&mut self, word: &str) -> Result<(), String> {
        self.skip_ws();
        let after = self.rest().strip_prefix(word);
        match after {
            // A word ends where a name could not go on: `true,` and
            // `false)` in a list, `in(` (not `trueish`, `android`).
            Some(a) if !a.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') => {
                self.pos += word.len();
                Ok(())
            }
            _ => self.err(&format!("expected `{word}`")),
        }
    }

    fn ident(&mut self) -> Result<String, String> {
        self.skip_ws();
        let len =
            self.rest().find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(self.rest().len());
        if len == 0 || self.rest().starts_with(|c: char| c.is_ascii_digit()) {
            return self.err("expected an attribute name or `type`");
        }
        let name = self.rest()[..len].to_string();
        self.pos += len;
        Ok(name)
    }

    fn op(&mut self) -> Result<Op, String> {
        self.skip_ws();
        for (text, op) in
            [("==", Op::Eq), ("!=", Op::Ne), ("<=", Op::Le), (">=", Op::Ge), ("<", Op::Lt), (">", Op::Gt)]
        {
            if self.rest().starts_with(text) {
                self.pos += text.len();
                return Ok(op);
            }
        }
        if self.keyword("in").is_ok() {
            return Ok(Op::In);
        }
        self.err("expected a comparison (==, !=, <, <=, >, >=, in)")
    }

    fn literal(&mut self) -> Result<Value, String> {
        self.skip_ws();
        if let Some(body) = self.rest().strip_prefix('"') {
            let Some(end) = body.find('"') else { return self.err("unterminated string") };
            let value = Value::Str(body[..end].to_string());
            self.pos += end + 2;
            return Ok(value);
        }
        for (word, v) in [("true", true), ("false", false)] {
            if self.keyword(word).is_ok() {
                return Ok(Value::Bool(v));
            }
        }
        let rest = self.rest();
        let len = rest
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E')))
            .unwrap_or(rest.len());
        let token = &rest[..len];
        let value = if let Ok(i) = token.parse::<i64>() {
            Value::Int(i)
        } else if let Ok(f) =
            token.parse::<f64>().map_err(|_| ()).and_then(|f| if f.is_finite() { Ok(f) } else { Err(()) })
        {
            Value::Float(f)
        } else {
            return self.err("expected a string, number, true or false");
        };
        self.pos += len;
        Ok(value)
    }

    fn condition(&mut self) -> Result<Condition, String> {
        let name = self.ident()?;
        let op = self.op()?;
        let values = if op == Op::In {
            self.skip_ws();
            if !self.rest().starts_with('(') {
                return self.err("expected `(` after `in`");
            }
            self.pos += 1;
            let mut values = vec![self.literal()?];
            loop {
                self.skip_ws();
                match self.rest().chars().next() {
                    Some(',') => self.pos += 1,
                    Some(')') => {
                        self.pos += 1;
                        break;
                    }
                    _ => return self.err("expected `,` or `)`"),
                }
                values.push(self.literal()?);
            }
            values
        } else {
            vec![self.literal()?]
        };
        Ok(Condition { name, op, values })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event_type: &str, attrs: &[(&str, Value)]) -> Event {
        Event {
            user_id: "u".into(),
            family: "trade".into(),
            event_type: event_type.into(),
            time_ms: 1,
            event_id: String::new(),
            attrs: attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        }
    }

    #[test]
    fn integers_compare_exactly_from_apply_rules_7_and_rounded_before() {
        let sku = |v: Value| ev("view", &[("sku", v)]);
        let big = 9_007_199_254_740_993_i64; // 2^53 + 1: no f64 holds it
        let eq = Filter::parse("sku == 9007199254740993").unwrap();
        let within = Filter::parse("sku in (9007199254740993, 7)").unwrap();
        let above = Filter::parse("sku > 9007199254740992").unwrap();
        let exact = crate::rules::EXACT_INTEGERS;
        let before = exact - 1;
        for f in [&eq, &within, &above] {
            assert!(f.matches_by(&sku(Value::Int(big)), exact));
            assert!(!f.matches_by(&sku(Value::Int(big - 1)), exact), "{f:?}");
        }
        // Before, 2^53 + 1 rounded to 2^53: equal to its neighbour, and
        // not above it.
        assert!(eq.matches_by(&sku(Value::Int(big - 1)), before));
        assert!(within.matches_by(&sku(Value::Int(big - 1)), before));
        assert!(!above.matches_by(&sku(Value::Int(big)), before));
        assert!(eq.matches(&sku(Value::Int(big))), "the newest rules are exact");
        assert!(!eq.matches(&sku(Value::Int(big + 1))));
        // Against floats: exact both ways, fractions and range ends too.
        let cmp = |i: i64, f: f64| compare(&Value::Int(i), &Value::Float(f), true);
        use std::cmp::Ordering::{Equal, Greater, Less};
        assert_eq!(cmp(big, 9_007_199_254_740_992.0), Some(Greater));
        assert_eq!(cmp(big - 1, 9_007_199_254_740_992.0), Some(Equal));
        assert_eq!(cmp(3, 3.5), Some(Less));
        assert_eq!(cmp(3, 2.5), Some(Greater));
        assert_eq!(cmp(-3, -3.5), Some(Greater));
        assert_eq!(cmp(0, -0.5), Some(Greater));
        assert_eq!(cmp(0, -0.0), Some(Equal));
        assert_eq!(cmp(i64::MAX, 9_223_372_036_854_775_808.0), Some(Less));
        assert_eq!(cmp(i64::MIN, -9_223_372_036_854_775_808.0), Some(Equal));
        assert_eq!(cmp(i64::MIN, -1e19), Some(Greater));
        assert_eq!(cmp(1, f64::NAN), None);
        assert_eq!(compare(&Value::Float(2.5), &Value::Int(3), true), Some(Less));
        let amount = Filter::parse("amount >= 400").unwrap();
        assert!(amount.matches(&ev("x", &[("amount", Value::Float(400.0))])));
        assert!(!amount.matches(&ev("x", &[("amount", Value::Float(399.99))])));
    }

    #[test]
    fn conjunctions_of_comparisons() {
        let f =
            Filter::parse(r#"type == "order" and amount >= 400 and category in ("phone", "tv")"#).unwrap();
        let phone = Value::Str("phone".into());
        assert!(f.matches(&ev("order", &[("amount", Value::Int(400)), ("category", phone.clone())])));
        assert!(f.matches(&ev(
            "order",
            &[("amount", Value::Float(999.5)), ("category", Value::Str("tv".into()))]
        )));
        assert!(!f.matches(&ev("order", &[("amount", Value::Float(399.9)), ("category", phone.clone())])));
        assert!(!f.matches(&ev("refund", &[("amount", Value::Int(500)), ("category", phone.clone())])));
        assert!(!f.matches(&ev("order", &[("category", phone)])), "missing attribute is false");
    }

    #[test]
    fn type_mismatch_is_false_and_ne_needs_same_kind() {
        let f = Filter::parse("amount > 10").unwrap();
        assert!(!f.matches(&ev("x", &[("amount", Value::Str("99".into()))])));
        let f = Filter::parse(r#"channel != "app""#).unwrap();
        assert!(f.matches(&ev("x", &[("channel", Value::Str("web".into()))])));
        assert!(!f.matches(&ev("x", &[("channel", Value::Int(3))])));
        let f = Filter::parse("vip == true").unwrap();
        assert!(f.matches(&ev("x", &[("vip", Value::Bool(true))])));
    }

    #[test]
    fn booleans_close_a_list_and_words_end_where_a_name_would() {
        let f = Filter::parse("vip in (true,false) and type in(\"a\",\"b\")").unwrap();
        assert!(f.matches(&ev("a", &[("vip", Value::Bool(false))])));
        assert!(!f.matches(&ev("c", &[("vip", Value::Bool(false))])));
        let f = Filter::parse("flag in (false)").unwrap();
        assert!(f.matches(&ev("x", &[("flag", Value::Bool(false))])));
        assert!(!f.matches(&ev("x", &[("flag", Value::Bool(true))])));
        // A longer word is not the keyword.
        assert_eq!(
            Filter::parse("vip == trueish").unwrap_err(),
            "column 8: expected a string, number, true or false"
        );
        assert_eq!(Filter::parse("a == 1 android == 2").unwrap_err(), "column 8: expected `and`");
    }

    #[test]
    fn parse_errors_have_columns() {
        assert_eq!(
            Filter::parse("amount >> 3").unwrap_err(),
            "column 9: expected a string, number, true or false"
        );
        assert_eq!(
            Filter::parse("amount").unwrap_err(),
            "column 7: expected a comparison (==, !=, <, <=, >, >=, in)"
        );
        assert_eq!(Filter::parse("a == 1 or b == 2").unwrap_err(), "column 8: expected `and`");
        assert_eq!(Filter::parse(r#"c == "x"#).unwrap_err(), "column 6: unterminated string");
        assert_eq!(Filter::parse("c in (1, 2").unwrap_err(), "column 11: expected `,` or `)`");
        assert!(Filter::parse("").is_err());
    }
}
