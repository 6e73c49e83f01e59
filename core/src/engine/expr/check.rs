//! [`Ast`] → typed [`Node`]: resolves names to slots through the caller's
//! catalog, checks every operator's and function's operand types, and
//! enforces `max_depth` on the tree. Errors point at the offending token.
//!
//! A `null` literal has no type of its own (`None` here) and fits anywhere
//! a value is expected, except as a comparison operand.

use std::collections::BTreeSet;

use super::ast::{ArithOp, Ast, AstKind, CmpOp};
use super::functions::{self, Func, Param, Ret, Sig};
use super::{Compiled, ExprError, Limits, Pos, Type, Val};

/// A type-checked expression with names resolved to slots.
#[derive(Clone, Debug)]
pub(super) enum Node {
    Lit(Val),
    Now,
    /// A slot and the type the catalog declared for it.
    Slot(usize, Type),
    Neg(Box<Node>),
    Not(Box<Node>),
    Arith(ArithOp, Box<Node>, Box<Node>),
    Cmp(CmpOp, Box<Node>, Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
    In {
        value: Box<Node>,
        list: Vec<Val>,
        negated: bool,
    },
    Case {
        arms: Vec<(Node, Node)>,
        default: Option<Box<Node>>,
    },
    /// `band(value, thresholds...)`, thresholds strictly ascending.
    Band(Box<Node>, Vec<f64>),
    Call(Func, Vec<Node>),
}

/// A static type; `None` is the type of `null`.
type Ty = Option<Type>;
type Checked = Result<(Node, Ty), ExprError>;

pub(super) fn check(
    ast: &Ast,
    resolve: &dyn Fn(&str) -> Option<(usize, Type)>,
    limits: &Limits,
) -> Result<Compiled, ExprError> {
    let mut checker = Checker { resolve, limits, slots: BTreeSet::new(), uses_now: false };
    let (root, ty) = checker.check(ast, 1)?;
    let Some(ty) = ty else {
        return Err(ExprError::at(ast.start, "expression is always null"));
    };
    Ok(Compiled { root, ty, slots: checker.slots.into_iter().collect(), uses_now: checker.uses_now })
}

fn show(ty: Ty) -> String {
    ty.map_or_else(|| "null".to_owned(), |t| t.to_string())
}

fn boxed(node: Node) -> Box<Node> {
    Box::new(node)
}

struct Checker<'c> {
    resolve: &'c dyn Fn(&str) -> Option<(usize, Type)>,
    limits: &'c Limits,
    slots: BTreeSet<usize>,
    uses_now: bool,
}

impl Checker<'_> {
    fn check(&mut self, ast: &Ast, depth: usize) -> Checked {
        if depth > self.limits.max_depth {
            let message = format!("expression is nested too deeply (max_depth {})", self.limits.max_depth);
            return Err(ExprError::at(ast.start, message));
        }
        let d = depth + 1;
        match &ast.kind {
            AstKind::Null => Ok((Node::Lit(Val::Null), None)),
            AstKind::Bool(b) => Ok((Node::Lit(Val::Bool(*b)), Some(Type::Bool))),
            AstKind::Num(n) => Ok((Node::Lit(Val::Num(*n)), Some(Type::Num))),
            AstKind::Str(s) => Ok((Node::Lit(Val::Str(s.clone())), Some(Type::Str))),
            AstKind::Now => {
                self.uses_now = true;
                Ok((Node::Now, Some(Type::Num)))
            }
            AstKind::Name(name) => self.name(name, ast.pos),
            AstKind::Neg(x) => {
                let x = self.expect_operand(x, d, Type::Num, "-")?;
                Ok((Node::Neg(boxed(x)), Some(Type::Num)))
            }
            AstKind::Not(x) => {
                let x = self.expect_operand(x, d, Type::Bool, "not")?;
                Ok((Node::Not(boxed(x)), Some(Type::Bool)))
            }
            AstKind::Arith(op, a, b) => self.arith(*op, a, b, ast.pos, d),
            AstKind::Cmp(op, a, b) => self.compare(*op, a, b, ast.pos, d),
            AstKind::And(items) => Ok((Node::And(self.logic(items, "and", d)?), Some(Type::Bool))),
            AstKind::Or(items) => Ok((Node::Or(self.logic(items, "or", d)?), Some(Type::Bool))),
            AstKind::In { value, list, negated } => self.member(value, list, *negated, d),
            AstKind::Case { arms, default } => self.case(arms, default.as_deref(), d),
            AstKind::Call(name, args) if name == "band" => self.band(args, ast.pos, d),
            AstKind::Call(name, args) => self.call(name, args, ast.pos, d),
        }
    }

    fn name(&mut self, name: &str, pos: Pos) -> Checked {
        let Some((slot, ty)) = (self.resolve)(name) else {
            return Err(ExprError::at(pos, format!("unknown name `{name}`")));
        };
        self.slots.insert(slot);
        Ok((Node::Slot(slot, ty), Some(ty)))
    }

    /// Checks the operand of a unary operator.
    fn expect_operand(&mut self, x: &Ast, depth: usize, want: Type, op: &str) -> Result<Node, ExprError> {
        let (node, ty) = self.check(x, depth)?;
        if ty.is_some_and(|t| t != want) {
            return Err(ExprError::at(x.start, format!("cannot apply `{op}` to {}", show(ty))));
        }
        Ok(node)
    }

    fn arith(&mut self, op: ArithOp, a: &Ast, b: &Ast, pos: Pos, depth: usize) -> Checked {
        let ((na, ta), (nb, tb)) = (self.check(a, depth)?, self.check(b, depth)?);
        let num = |t: Ty| t.is_none_or(|t| t == Type::Num);
        if !num(ta) || !num(tb) {
            let message = format!("cannot apply `{}` to {} and {}", op.symbol(), show(ta), show(tb));
            return Err(ExprError::at(pos, message));
        }
        let divides = matches!(op, ArithOp::Div | ArithOp::Rem);
        if divides && matches!(b.kind, AstKind::Num(n) if n == 0.0) {
            return Err(ExprError::at(pos, "division by zero"));
        }
        Ok((Node::Arith(op, boxed(na), boxed(nb)), Some(Type::Num)))
    }

    fn compare(&mut self, op: CmpOp, a: &Ast, b: &Ast, pos: Pos, depth: usize) -> Checked {
        let ((na, ta), (nb, tb)) = (self.check(a, depth)?, self.check(b, depth)?);
        let (Some(ta), Some(tb)) = (ta, tb) else {
            let message = "comparing with null is never true; test with `is_null(...)`";
            return Err(ExprError::at(pos, message));
        };
        let comparable = match ta {
            Type::Num | Type::Str => true,
            Type::Bool => !op.is_ordering(),
            Type::Set | Type::Map => false,
        };
        if ta != tb || !comparable {
            let message = format!("cannot apply `{}` to {ta} and {tb}", op.symbol());
            return Err(ExprError::at(pos, message));
        }
        Ok((Node::Cmp(op, boxed(na), boxed(nb)), Some(Type::Bool)))
    }

    fn logic(&mut self, items: &[Ast], op: &str, depth: usize) -> Result<Vec<Node>, ExprError> {
        let mut nodes = Vec::with_capacity(items.len());
        for item in items {
            let (node, ty) = self.check(item, depth)?;
            if ty.is_some_and(|t| t != Type::Bool) {
                let message = format!("`{op}` needs Bool operands, found {}", show(ty));
                return Err(ExprError::at(item.start, message));
            }
            nodes.push(node);
        }
        Ok(nodes)
    }

    fn member(&mut self, value: &Ast, list: &[Ast], negated: bool, depth: usize) -> Checked {
        let (node, ty) = self.check(value, depth)?;
        let ty = match ty {
            Some(t @ (Type::Num | Type::Str)) => t,
            other => {
                let message = format!("`in` needs a Num or Str value, found {}", show(other));
                return Err(ExprError::at(value.start, message));
            }
        };
        let mut values = Vec::with_capacity(list.len());
        for item in list {
            let (Node::Lit(v), item_ty) = self.check(item, depth)? else {
                return Err(ExprError::at(item.start, "`in` lists hold literals"));
            };
            if item_ty != Some(ty) {
                let message = format!("`in` list items must be {ty} like the value, found {}", show(item_ty));
                return Err(ExprError::at(item.start, message));
            }
            values.push(v);
        }
        Ok((Node::In { value: boxed(node), list: values, negated }, Some(Type::Bool)))
    }

    fn case(&mut self, arms: &[(Ast, Ast)], default: Option<&Ast>, depth: usize) -> Checked {
        let mut unify = Unify::new("`case` branches");
        let mut nodes = Vec::with_capacity(arms.len());
        for (cond, value) in arms {
            let (c, ty) = self.check(cond, depth)?;
            if ty.is_some_and(|t| t != Type::Bool) {
                let message = format!("`when` needs a Bool condition, found {}", show(ty));
                return Err(ExprError::at(cond.start, message));
            }
            let (v, ty) = self.check(value, depth)?;
            unify.add(ty, value.start)?;
            nodes.push((c, v));
        }
        let default = match default {
            Some(value) => {
                let (v, ty) = self.check(value, depth)?;
                unify.add(ty, value.start)?;
                Some(boxed(v))
            }
            None => None,
        };
        Ok((Node::Case { arms: nodes, default }, unify.ty))
    }

    fn band(&mut self, args: &[Ast], pos: Pos, depth: usize) -> Checked {
        let Some((value, thresholds)) = args.split_first().filter(|(_, t)| !t.is_empty()) else {
            return Err(ExprError::at(pos, "`band` takes a value and at least one threshold"));
        };
        let (node, ty) = self.check(value, depth)?;
        if ty.is_some_and(|t| t != Type::Num) {
            let message = format!("argument 1 of `band` must be Num, found {}", show(ty));
            return Err(ExprError::at(value.start, message));
        }
        let mut limits: Vec<f64> = Vec::with_capacity(thresholds.len());
        for t in thresholds {
            let AstKind::Num(n) = t.kind else {
                return Err(ExprError::at(t.start, "`band` thresholds must be number literals"));
            };
            if limits.last().is_some_and(|&prev| n <= prev) {
                return Err(ExprError::at(t.start, "`band` thresholds must be ascending"));
            }
            limits.push(n);
        }
        Ok((Node::Band(boxed(node), limits), Some(Type::Num)))
    }

    fn call(&mut self, name: &str, args: &[Ast], pos: Pos, depth: usize) -> Checked {
        let Some(sig) = functions::lookup(name) else {
            return Err(ExprError::at(pos, format!("unknown function `{name}`")));
        };
        check_arity(sig, args.len(), pos)?;
        let mut unify = Unify::new(&format!("arguments of `{name}`"));
        let mut nodes = Vec::with_capacity(args.len());
        for (i, arg) in args.iter().enumerate() {
            let (node, ty) = self.check(arg, depth)?;
            let param = sig.params.get(i).or(sig.params.last()).copied().unwrap_or(Param::Any);
            let fits = match (param, ty) {
                (_, None) | (Param::Any, _) => true,
                (Param::Is(want), Some(t)) => t == want,
                (Param::Collection, Some(t)) => matches!(t, Type::Set | Type::Map),
                (Param::Same, _) => unify.add(ty, arg.start).map(|_| true)?,
            };
            if !fits {
                let want = match param {
                    Param::Is(t) => t.to_string(),
                    _ => "Set or Map".to_owned(),
                };
                let message = format!("argument {} of `{name}` must be {want}, found {}", i + 1, show(ty));
                return Err(ExprError::at(arg.start, message));
            }
            nodes.push(node);
        }
        let ty = match sig.ret {
            Ret::Is(t) => Some(t),
            Ret::Same => unify.ty,
        };
        Ok((Node::Call(sig.func, nodes), ty))
    }
}

fn check_arity(sig: &Sig, found: usize, pos: Pos) -> Result<(), ExprError> {
    let want = sig.params.len();
    let plural = |n: usize| if n == 1 { "argument" } else { "arguments" };
    let message = if sig.variadic && found < want {
        format!("`{}` takes at least {want} {}, found {found}", sig.name, plural(want))
    } else if !sig.variadic && found != want {
        format!("`{}` takes {want} {}, found {found}", sig.name, plural(want))
    } else {
        return Ok(());
    };
    Err(ExprError::at(pos, message))
}

/// The one type several values must share (a `null` literal fits any).
struct Unify {
    what: String,
    ty: Ty,
}

impl Unify {
    fn new(what: &str) -> Unify {
        Unify { what: what.to_owned(), ty: None }
    }

    fn add(&mut self, ty: Ty, pos: Pos) -> Result<(), ExprError> {
        match (self.ty, ty) {
            (_, None) => Ok(()),
            (None, t) => {
                self.ty = t;
                Ok(())
            }
            (Some(a), Some(b)) if a == b => Ok(()),
            (Some(a), Some(b)) => {
                Err(ExprError::at(pos, format!("{} have different types: {a} and {b}", self.what)))
            }
        }
    }
}
