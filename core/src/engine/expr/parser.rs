//! Tokens → [`Ast`], by recursive descent with one function per precedence
//! level, lowest first: `or`, `and`, `not`, comparisons and `in`
//! (non-associative), `+ -`, `* / %`, unary `-`.
//!
//! The parser enforces `max_nodes` and bounds its own recursion by
//! `max_depth` (parentheses, calls, `case`, `not` and unary `-` nest).

use super::ast::{ArithOp, Ast, AstKind, CmpOp};
use super::lexer::{Tok, Token};
use super::{ExprError, Limits, Pos};

/// Words that cannot be names. Function names are not reserved: a name
/// followed by `(` is a call.
pub const RESERVED: &[&str] =
    &["and", "or", "not", "in", "case", "when", "then", "else", "end", "true", "false", "null", "now"];

type Parse<T = Ast> = Result<T, ExprError>;

pub(super) fn parse(tokens: Vec<Token>, limits: &Limits) -> Parse {
    let eof = Token { tok: Tok::Eof, pos: tokens.last().map_or(Pos::START, |t| t.pos) };
    let mut p = Parser { tokens, i: 0, eof, limits, nodes: 0, nesting: 0 };
    let ast = p.or_expr()?;
    if p.peek().tok != Tok::Eof {
        return Err(p.expected("an operator or the end of the expression"));
    }
    Ok(ast)
}

struct Parser<'l> {
    tokens: Vec<Token>,
    i: usize,
    eof: Token,
    limits: &'l Limits,
    nodes: usize,
    nesting: usize,
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Num(_) => "a number".into(),
        Tok::Str(s) => format!("the string {s:?}"),
        Tok::Ident(s) => format!("`{s}`"),
        Tok::Sym(s) => format!("`{s}`"),
        Tok::Eof => "the end of the expression".into(),
    }
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        self.tokens.get(self.i).unwrap_or(&self.eof)
    }

    fn peek_is_kw_at(&self, ahead: usize, kw: &str) -> bool {
        let tok = self.tokens.get(self.i + ahead).map(|t| &t.tok);
        matches!(tok, Some(Tok::Ident(s)) if s == kw)
    }

    fn at_kw(&self, kw: &str) -> bool {
        self.peek_is_kw_at(0, kw)
    }

    fn at_sym(&self, sym: &str) -> bool {
        matches!(self.peek().tok, Tok::Sym(s) if s == sym)
    }

    fn bump(&mut self) -> Token {
        let token = self.peek().clone();
        self.i = (self.i + 1).min(self.tokens.len());
        token
    }

    fn expected(&self, what: &str) -> ExprError {
        let t = self.peek();
        ExprError::at(t.pos, format!("expected {what}, found {}", describe(&t.tok)))
    }

    fn expect_sym(&mut self, sym: &str, what: &str) -> Parse<()> {
        if !self.at_sym(sym) {
            return Err(self.expected(what));
        }
        self.bump();
        Ok(())
    }

    fn expect_kw(&mut self, kw: &str, what: &str) -> Parse<()> {
        if !self.at_kw(kw) {
            return Err(self.expected(what));
        }
        self.bump();
        Ok(())
    }

    fn node(&mut self, kind: AstKind, pos: Pos, start: Pos) -> Parse {
        self.nodes += 1;
        if self.nodes > self.limits.max_nodes {
            let message = format!("expression has too many nodes (max_nodes {})", self.limits.max_nodes);
            return Err(ExprError::at(pos, message));
        }
        Ok(Ast { kind, pos, start })
    }

    /// Runs `inner` one nesting level deeper; `pos` is the opening token.
    fn nested<T>(&mut self, pos: Pos, inner: impl FnOnce(&mut Self) -> Parse<T>) -> Parse<T> {
        if self.nesting >= self.limits.max_depth {
            let message = format!("expression is nested too deeply (max_depth {})", self.limits.max_depth);
            return Err(ExprError::at(pos, message));
        }
        self.nesting += 1;
        let result = inner(self);
        self.nesting -= 1;
        result
    }

    fn or_expr(&mut self) -> Parse {
        self.chain("or", Self::and_expr, AstKind::Or)
    }

    fn and_expr(&mut self) -> Parse {
        self.chain("and", Self::not_expr, AstKind::And)
    }

    fn chain(&mut self, kw: &str, operand: fn(&mut Self) -> Parse, make: fn(Vec<Ast>) -> AstKind) -> Parse {
        let first = operand(self)?;
        if !self.at_kw(kw) {
            return Ok(first);
        }
        let (pos, start) = (self.peek().pos, first.start);
        let mut items = vec![first];
        while self.at_kw(kw) {
            self.bump();
            items.push(operand(self)?);
        }
        self.node(make(items), pos, start)
    }

    fn not_expr(&mut self) -> Parse {
        if !self.at_kw("not") {
            return self.cmp_expr();
        }
        let pos = self.bump().pos;
        let operand = self.nested(pos, Self::not_expr)?;
        self.node(AstKind::Not(Box::new(operand)), pos, pos)
    }

    fn cmp_op(&self) -> Option<CmpOp> {
        let Tok::Sym(sym) = self.peek().tok else { return None };
        Some(match sym {
            "==" => CmpOp::Eq,
            "!=" => CmpOp::Ne,
            "<" => CmpOp::Lt,
            "<=" => CmpOp::Le,
            ">" => CmpOp::Gt,
            ">=" => CmpOp::Ge,
            _ => return None,
        })
    }

    fn cmp_expr(&mut self) -> Parse {
        let left = self.add_expr()?;
        let ast = if let Some(op) = self.cmp_op() {
            let pos = self.bump().pos;
            let right = self.add_expr()?;
            let start = left.start;
            self.node(AstKind::Cmp(op, Box::new(left), Box::new(right)), pos, start)?
        } else if self.at_kw("in") || (self.at_kw("not") && self.peek_is_kw_at(1, "in")) {
            self.in_list(left)?
        } else {
            return Ok(left);
        };
        if self.cmp_op().is_some() || self.at_kw("in") {
            let message = "comparisons cannot be chained; combine them with `and`";
            return Err(ExprError::at(self.peek().pos, message));
        }
        Ok(ast)
    }

    fn in_list(&mut self, value: Ast) -> Parse {
        let negated = self.at_kw("not");
        if negated {
            self.bump();
        }
        let pos = self.bump().pos;
        self.expect_sym("(", "`(` after `in`")?;
        let mut list = vec![self.literal()?];
        while self.at_sym(",") {
            self.bump();
            list.push(self.literal()?);
        }
        self.expect_sym(")", "`,` or `)`")?;
        let start = value.start;
        self.node(AstKind::In { value: Box::new(value), list, negated }, pos, start)
    }

    /// A literal in an `in` list: a number or duration (maybe negative), a
    /// string, `true` or `false`.
    fn literal(&mut self) -> Parse {
        let t = self.peek().clone();
        let next = self.tokens.get(self.i + 1).map(|t| &t.tok);
        let (kind, len) = match (t.tok, next) {
            (Tok::Num(n), _) => (AstKind::Num(n), 1),
            (Tok::Sym("-"), Some(&Tok::Num(n))) => (AstKind::Num(-n), 2),
            (Tok::Str(s), _) => (AstKind::Str(s), 1),
            (Tok::Ident(s), _) if s == "true" || s == "false" => (AstKind::Bool(s == "true"), 1),
            _ => return Err(self.expected("a literal (`in` lists hold numbers, strings, true or false)")),
        };
        for _ in 0..len {
            self.bump();
        }
        self.node(kind, t.pos, t.pos)
    }

    fn add_expr(&mut self) -> Parse {
        self.arith(&[("+", ArithOp::Add), ("-", ArithOp::Sub)], Self::mul_expr)
    }

    fn mul_expr(&mut self) -> Parse {
        self.arith(&[("*", ArithOp::Mul), ("/", ArithOp::Div), ("%", ArithOp::Rem)], Self::unary)
    }

    fn arith(&mut self, ops: &[(&str, ArithOp)], operand: fn(&mut Self) -> Parse) -> Parse {
        let mut left = operand(self)?;
        while let Some(&(_, op)) = ops.iter().find(|(sym, _)| self.at_sym(sym)) {
            let pos = self.bump().pos;
            let right = operand(self)?;
            let start = left.start;
            left = self.node(AstKind::Arith(op, Box::new(left), Box::new(right)), pos, start)?;
        }
        Ok(left)
    }

    fn unary(&mut self) -> Parse {
        if !self.at_sym("-") {
            return self.primary();
        }
        let pos = self.bump().pos;
        if let Tok::Num(n) = self.peek().tok {
            self.bump();
            return self.node(AstKind::Num(-n), pos, pos);
        }
        let operand = self.nested(pos, Self::unary)?;
        self.node(AstKind::Neg(Box::new(operand)), pos, pos)
    }

    fn primary(&mut self) -> Parse {
        let t = self.peek().clone();
        let kind = match t.tok {
            Tok::Num(n) => AstKind::Num(n),
            Tok::Str(s) => AstKind::Str(s),
            Tok::Sym("(") => {
                self.bump();
                let inner = self.nested(t.pos, Self::or_expr)?;
                self.expect_sym(")", "`)`")?;
                return Ok(inner);
            }
            Tok::Ident(name) => match name.as_str() {
                "true" | "false" => AstKind::Bool(name == "true"),
                "null" => AstKind::Null,
                "now" => AstKind::Now,
                "case" => return self.case(),
                _ if RESERVED.contains(&name.as_str()) => return Err(self.expected("an expression")),
                _ if self.tokens.get(self.i + 1).is_some_and(|n| n.tok == Tok::Sym("(")) => {
                    return self.call(name, t.pos)
                }
                _ => AstKind::Name(name),
            },
            _ => return Err(self.expected("an expression")),
        };
        self.bump();
        self.node(kind, t.pos, t.pos)
    }

    fn call(&mut self, name: String, pos: Pos) -> Parse {
        self.bump();
        self.bump();
        let args = self.nested(pos, |p| {
            let mut args = Vec::new();
            if !p.at_sym(")") {
                args.push(p.or_expr()?);
                while p.at_sym(",") {
                    p.bump();
                    args.push(p.or_expr()?);
                }
            }
            p.expect_sym(")", "`,` or `)`")?;
            Ok(args)
        })?;
        self.node(AstKind::Call(name, args), pos, pos)
    }

    fn case(&mut self) -> Parse {
        let pos = self.bump().pos;
        self.nested(pos, |p| {
            let mut arms = Vec::new();
            if !p.at_kw("when") {
                return Err(p.expected("`when` after `case`"));
            }
            while p.at_kw("when") {
                p.bump();
                let cond = p.or_expr()?;
                p.expect_kw("then", "`then`")?;
                arms.push((cond, p.or_expr()?));
            }
            let mut default = None;
            if p.at_kw("else") {
                p.bump();
                default = Some(Box::new(p.or_expr()?));
                p.expect_kw("end", "`end`")?;
            } else {
                p.expect_kw("end", "`when`, `else` or `end`")?;
            }
            p.node(AstKind::Case { arms, default }, pos, pos)
        })
    }
}
