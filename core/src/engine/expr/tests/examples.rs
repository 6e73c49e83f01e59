//! The product's example rules, with concrete profiles.

use super::*;
use crate::duration::{DAY_MS, MONTH_MS};

fn days_ago(days: i64) -> Val {
    num((NOW - days * DAY_MS) as f64)
}

const LIFECYCLE: &str = r#"case
    when orders_lifetime == 0 then "prospect"
    when now - last_order_time > 180d then "churned"
    when now - first_order_time < 13mo then "new"
    when now - first_order_time < 24mo then "established"
    else "loyal"
end"#;

#[test]
fn churn_risk() {
    let src = "orders_lifetime > 0 and now - last_order_time > 30d";
    let at_risk = [("orders_lifetime", num(4.0)), ("last_order_time", days_ago(31))];
    assert_eq!(run(src, &at_risk), Val::Bool(true));
    let recent = [("orders_lifetime", num(4.0)), ("last_order_time", days_ago(29))];
    assert_eq!(run(src, &recent), Val::Bool(false));
    let never = [("orders_lifetime", num(0.0))];
    assert_eq!(run(src, &never), Val::Bool(false));
    let exactly = [("orders_lifetime", num(1.0)), ("last_order_time", days_ago(30))];
    assert_eq!(run(src, &exactly), Val::Bool(false));
}

#[test]
fn lifecycle_stage() {
    let user = |orders: f64, first: i64, last: i64| {
        vec![
            ("orders_lifetime", num(orders)),
            ("first_order_time", days_ago(first)),
            ("last_order_time", days_ago(last)),
        ]
    };
    assert_eq!(run(LIFECYCLE, &[("orders_lifetime", num(0.0))]), text("prospect"));
    assert_eq!(run(LIFECYCLE, &user(9.0, 900, 181)), text("churned"));
    assert_eq!(run(LIFECYCLE, &user(2.0, 100, 10)), text("new"));
    assert_eq!(run(LIFECYCLE, &user(5.0, 500, 10)), text("established"));
    assert_eq!(run(LIFECYCLE, &user(50.0, 800, 1)), text("loyal"));
    // 13 months is 390 days.
    assert_eq!(run(LIFECYCLE, &user(2.0, 389, 1)), text("new"));
    assert_eq!(run(LIFECYCLE, &user(2.0, 390, 1)), text("established"));
    assert_eq!(compiled(LIFECYCLE).ty(), Type::Str);
}

#[test]
fn rfm_scores() {
    let recency = "6 - band(days(now - last_order_time), 7, 30, 90, 180)";
    for (ago, want) in [(0, 5.0), (6, 5.0), (7, 4.0), (45, 3.0), (100, 2.0), (365, 1.0)] {
        assert_eq!(run(recency, &[("last_order_time", days_ago(ago))]), num(want), "{ago} days");
    }
    let monetary = "band(spend_365d, 100, 500, 2000, 10000)";
    for (spend, want) in [(0.0, 1.0), (100.0, 2.0), (499.99, 2.0), (2500.0, 4.0), (10000.0, 5.0)] {
        assert_eq!(run(monetary, &[("spend_365d", num(spend))]), num(want), "spend {spend}");
    }
    assert_eq!(run(recency, &[]), Val::Null);
}

#[test]
fn browsed_without_ordering() {
    let src = "size(difference(keys_at_least(browse_cat_7d, 3), keys(order_cat_7d))) > 0";
    let browse = map(&[("phone", 4.0), ("shoe", 3.0), ("book", 1.0)]);
    let ordered_phone = [("browse_cat_7d", browse.clone()), ("order_cat_7d", map(&[("phone", 1.0)]))];
    assert_eq!(run(src, &ordered_phone), Val::Bool(true));
    let ordered_both = [("browse_cat_7d", browse), ("order_cat_7d", map(&[("phone", 1.0), ("shoe", 2.0)]))];
    assert_eq!(run(src, &ordered_both), Val::Bool(false));
    assert_eq!(run(src, &[("order_cat_7d", map(&[]))]), Val::Bool(false));
}

#[test]
fn favourite_category() {
    let values = [("browse_cat_30d", map(&[("phone", 2.0), ("book", 7.0)]))];
    assert_eq!(run("top(browse_cat_30d)", &values), text("book"));
    assert_eq!(run("get(browse_cat_30d, \"phone\") >= 2", &values), Val::Bool(true));
    assert_eq!(run("get(browse_cat_30d, \"shoe\") >= 2", &values), Val::Bool(false));
}

#[test]
fn attributes_scores_and_helpers() {
    let city = |c: &str| [("registration.city", text(c))];
    assert_eq!(run("registration.city == \"Beijing\"", &city("Beijing")), Val::Bool(true));
    assert_eq!(run("registration.city == \"Beijing\"", &city("Shanghai")), Val::Bool(false));
    assert_eq!(run("registration.city in (\"Beijing\", \"Shanghai\")", &city("Shanghai")), Val::Bool(true));
    assert_eq!(run("coalesce(model_score, 0) > 0.7", &[("model_score", num(0.71))]), Val::Bool(true));
    assert_eq!(run("coalesce(model_score, 0) > 0.7", &[]), Val::Bool(false));
    assert_eq!(run("if(is_null(model_score), \"unscored\", \"scored\")", &[]), text("unscored"));
    let times = [("first_order_time", days_ago(400)), ("last_order_time", days_ago(3))];
    assert_eq!(run("floor(days(now - first_order_time) / 30)", &times), num(13.0));
    assert_eq!(run("hours(now - last_order_time)", &times), num(72.0));
    let tenure = "max(now - first_order_time, 13mo) == now - first_order_time";
    assert_eq!(run(tenure, &times), Val::Bool(true));
    assert_eq!(run("min(abs(last_order_time - now), 1mo)", &times), num((3 * DAY_MS) as f64));
    assert_eq!(run("min(abs(first_order_time - now), 1mo)", &times), num(MONTH_MS as f64));
}
