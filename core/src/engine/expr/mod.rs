//! The tag-rule expression language: `orders_lifetime > 0 and now - last_order_time > 30d`.
//!
//! Pure: no I/O, no clocks, no randomness, no `HashMap` iteration; depends
//! only on [`crate::duration`]. The stages, each in its own file:
//! `lexer` (text → tokens) → `parser` (tokens → `ast`) → `check` (names
//! resolved to slots through the caller's catalog, types checked, limits
//! enforced) → `eval` (slot values and `now` → a [`Val`], plus the next
//! moment at which passing time could change it; see `next_change`).
//! Built-in functions live in `functions`. The language is described for
//! users in `docs/tag-language.md`.
//!
//! Evaluation never panics: wrong-typed or non-finite slot values count as
//! `Null`, and every arithmetic result that is not finite is `Null`.

mod ast;
mod check;
mod eval;
mod functions;
mod lexer;
mod next_change;
mod parser;

pub use parser::RESERVED;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// The static type of an expression or of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Type {
    Bool,
    /// An `f64`; times are epoch milliseconds, durations milliseconds.
    Num,
    Str,
    /// A set of strings.
    Set,
    /// String → count.
    Map,
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::Bool => "Bool",
            Type::Num => "Num",
            Type::Str => "Str",
            Type::Set => "Set",
            Type::Map => "Map",
        })
    }
}

/// A runtime value. Any expression may evaluate to `Null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Val {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Set(BTreeSet<String>),
    Map(BTreeMap<String, f64>),
}

impl Val {
    /// The value's type; `None` for `Null`.
    pub fn ty(&self) -> Option<Type> {
        match self {
            Val::Null => None,
            Val::Bool(_) => Some(Type::Bool),
            Val::Num(_) => Some(Type::Num),
            Val::Str(_) => Some(Type::Str),
            Val::Set(_) => Some(Type::Set),
            Val::Map(_) => Some(Type::Map),
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Val::Null)
    }

    /// Null, zero, or an empty set or map (a feature that has seen nothing).
    pub fn is_empty_value(&self) -> bool {
        match self {
            Val::Null => true,
            Val::Num(n) => *n == 0.0,
            Val::Set(s) => s.is_empty(),
            Val::Map(m) => m.is_empty(),
            Val::Bool(_) | Val::Str(_) => false,
        }
    }
}

/// A 1-based line and column (in characters) of a token in the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pos {
    line: u32,
    col: u32,
}

impl Pos {
    const START: Pos = Pos { line: 1, col: 1 };
}

/// A compile error, located at the offending token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExprError {
    pub line: u32,
    pub col: u32,
    pub message: String,
}

impl ExprError {
    fn at(pos: Pos, message: impl Into<String>) -> ExprError {
        ExprError { line: pos.line, col: pos.col, message: message.into() }
    }
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: {}", self.line, self.col, self.message)
    }
}

impl std::error::Error for ExprError {}

/// Bounds on a rule's size, checked by [`compile`]. They also bound the
/// recursion of the parser, the checker and the evaluator, so keep them
/// modest: evaluation runs on the apply path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of source text.
    pub max_len: usize,
    /// Nesting depth of the syntax tree (an `and`/`or` chain is one level).
    pub max_depth: usize,
    /// Nodes in the syntax tree, `in` list items included.
    pub max_nodes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_len: 4096, max_depth: 32, max_nodes: 512 }
    }
}

/// A type-checked expression whose names are resolved to slot indexes.
#[derive(Clone, Debug)]
pub struct Compiled {
    root: check::Node,
    ty: Type,
    slots: Vec<usize>,
    uses_now: bool,
}

impl Compiled {
    /// The type of every non-`Null` result.
    pub fn ty(&self) -> Type {
        self.ty
    }

    /// The distinct slots the expression reads, sorted.
    pub fn slots(&self) -> &[usize] {
        &self.slots
    }

    /// Whether the expression mentions `now`.
    pub fn uses_now(&self) -> bool {
        self.uses_now
    }

    /// Evaluates against `slots` (indexed by the slots the catalog handed
    /// out) at `now_ms`. Lowers `*next_change` to the first millisecond after
    /// `now_ms` at which the result could change with no input changing,
    /// when there is one (see `docs/tag-language.md`, "Next change").
    ///
    /// A slot that is missing, `Null`, of another type than declared, or a
    /// non-finite number reads as `Null`.
    pub fn eval(&self, slots: &[Val], now_ms: i64, next_change: &mut Option<i64>) -> Val {
        let mut cx = eval::Ctx { slots, schedule: next_change::Schedule::new(now_ms, next_change) };
        eval::eval(&self.root, &mut cx).val.into_owned()
    }
}

/// Compiles `src`, resolving each name through `resolve` to a slot index and
/// its type.
pub fn compile(
    src: &str,
    resolve: &dyn Fn(&str) -> Option<(usize, Type)>,
    limits: &Limits,
) -> Result<Compiled, ExprError> {
    if src.len() > limits.max_len {
        let message = format!("expression is too long: {} bytes (max_len {})", src.len(), limits.max_len);
        return Err(ExprError::at(Pos::START, message));
    }
    let tokens = lexer::lex(src)?;
    let ast = parser::parse(tokens, limits)?;
    check::check(&ast, resolve, limits)
}
