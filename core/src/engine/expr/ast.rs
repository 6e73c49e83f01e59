//! The syntax tree the parser builds, before names and types are resolved,
//! and the operators shared by the later stages.

use std::cmp::Ordering;

use super::Pos;

/// A parsed expression node.
#[derive(Clone, Debug)]
pub(super) struct Ast {
    pub kind: AstKind,
    /// The token that names the node: the operator of `a + b`, the name of a
    /// call, the literal itself. Errors about the node itself point here.
    pub pos: Pos,
    /// The node's first token. Errors about the node as an operand point here.
    pub start: Pos,
}

#[derive(Clone, Debug)]
pub(super) enum AstKind {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Now,
    Name(String),
    Neg(Box<Ast>),
    Not(Box<Ast>),
    Arith(ArithOp, Box<Ast>, Box<Ast>),
    Cmp(CmpOp, Box<Ast>, Box<Ast>),
    /// `a and b and c`: one node per chain.
    And(Vec<Ast>),
    Or(Vec<Ast>),
    /// `value [not] in (literal, ...)`.
    In {
        value: Box<Ast>,
        list: Vec<Ast>,
        negated: bool,
    },
    Case {
        arms: Vec<(Ast, Ast)>,
        default: Option<Box<Ast>>,
    },
    Call(String, Vec<Ast>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl ArithOp {
    pub fn symbol(self) -> &'static str {
        match self {
            ArithOp::Add => "+",
            ArithOp::Sub => "-",
            ArithOp::Mul => "*",
            ArithOp::Div => "/",
            ArithOp::Rem => "%",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    /// Whether `a op b` holds, given how `a` orders against `b`; unordered
    /// operands (NaN) never compare true.
    pub fn test(self, ord: Option<Ordering>) -> bool {
        let Some(ord) = ord else { return false };
        match self {
            CmpOp::Eq => ord == Ordering::Equal,
            CmpOp::Ne => ord != Ordering::Equal,
            CmpOp::Lt => ord == Ordering::Less,
            CmpOp::Le => ord != Ordering::Greater,
            CmpOp::Gt => ord == Ordering::Greater,
            CmpOp::Ge => ord != Ordering::Less,
        }
    }

    /// Whether `d op 0` holds: the comparison `a op b` written as `a - b op 0`.
    pub fn holds(self, d: f64) -> bool {
        self.test(d.partial_cmp(&0.0))
    }

    /// Whether the operator orders its operands (as opposed to `==`, `!=`).
    pub fn is_ordering(self) -> bool {
        !matches!(self, CmpOp::Eq | CmpOp::Ne)
    }
}
