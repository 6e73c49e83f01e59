//! Source text → tokens. Names and keywords are lowercase ASCII; a number
//! followed directly by a unit is a duration in milliseconds (`30d`).

use super::{ExprError, Pos};
use crate::duration::parse_duration_ms;

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Tok {
    Num(f64),
    Str(String),
    /// A name, keyword or function name; may hold one dot (`family.attr`).
    Ident(String),
    /// Punctuation or an operator: `( ) , + - * / % == != < <= > >=`.
    Sym(&'static str),
    Eof,
}

#[derive(Clone, Debug)]
pub(super) struct Token {
    pub tok: Tok,
    pub pos: Pos,
}

/// Splits `src` into tokens, ending with one `Tok::Eof`.
pub(super) fn lex(src: &str) -> Result<Vec<Token>, ExprError> {
    let mut lexer = Lexer { chars: src.chars().collect(), i: 0, pos: Pos::START };
    let mut tokens = Vec::new();
    loop {
        lexer.skip_whitespace();
        let pos = lexer.pos;
        let Some(c) = lexer.peek(0) else {
            tokens.push(Token { tok: Tok::Eof, pos });
            return Ok(tokens);
        };
        let tok = match c {
            '0'..='9' => lexer.number(pos)?,
            '"' => lexer.string(pos)?,
            'a'..='z' | '_' => lexer.ident(pos)?,
            _ => lexer.symbol(pos, c)?,
        };
        tokens.push(Token { tok, pos });
    }
}

struct Lexer {
    chars: Vec<char>,
    i: usize,
    pos: Pos,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
}

impl Lexer {
    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.i + ahead).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek(0)?;
        self.i += 1;
        if c == '\n' {
            self.pos = Pos { line: self.pos.line.saturating_add(1), col: 1 };
        } else {
            self.pos.col = self.pos.col.saturating_add(1);
        }
        Some(c)
    }

    /// Consumes characters while `keep` holds and returns them.
    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> String {
        let mut out = String::new();
        while let Some(c) = self.peek(0).filter(|&c| keep(c)) {
            out.push(c);
            self.bump();
        }
        out
    }

    fn skip_whitespace(&mut self) {
        self.take_while(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
    }

    fn number(&mut self, pos: Pos) -> Result<Tok, ExprError> {
        let mut text = self.take_while(|c| c.is_ascii_digit());
        let integer = self.peek(0) != Some('.');
        if !integer {
            self.bump();
            if !self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
                return Err(ExprError::at(self.pos, "expected a digit after `.`"));
            }
            text.push('.');
            text.push_str(&self.take_while(|c| c.is_ascii_digit()));
        }
        let unit = self.take_while(|c| c.is_ascii_alphanumeric() || c == '_');
        if unit.is_empty() {
            return match text.parse::<f64>() {
                Ok(n) if n.is_finite() => Ok(Tok::Num(n)),
                _ => Err(ExprError::at(pos, "number is too large")),
            };
        }
        if !integer {
            return Err(ExprError::at(pos, "a duration takes a whole number, e.g. `90d`"));
        }
        text.push_str(&unit);
        parse_duration_ms(&text).map(|ms| Tok::Num(ms as f64)).map_err(|e| ExprError::at(pos, e))
    }

    fn string(&mut self, pos: Pos) -> Result<Tok, ExprError> {
        self.bump();
        let mut out = String::new();
        loop {
            let at = self.pos;
            match self.bump() {
                None => return Err(ExprError::at(pos, "unterminated string")),
                Some('"') => return Ok(Tok::Str(out)),
                Some('\\') => match self.bump() {
                    Some(c @ ('"' | '\\')) => out.push(c),
                    other => {
                        let shown = other.map(String::from).unwrap_or_default();
                        let message = format!(r#"unknown escape `\{shown}` in string (use \" or \\)"#);
                        return Err(ExprError::at(at, message));
                    }
                },
                Some(c) => out.push(c),
            }
        }
    }

    fn ident(&mut self, pos: Pos) -> Result<Tok, ExprError> {
        let mut name = self.take_while(is_name_char);
        if self.peek(0) == Some('.') {
            self.bump();
            if !self.peek(0).is_some_and(|c| c.is_ascii_lowercase() || c == '_') {
                return Err(ExprError::at(self.pos, format!("expected a name after `{name}.`")));
            }
            name.push('.');
            name.push_str(&self.take_while(is_name_char));
            if self.peek(0) == Some('.') {
                return Err(ExprError::at(pos, format!("`{name}.`: a name has at most one dot")));
            }
        }
        if let Some(c) = self.peek(0).filter(|c| c.is_ascii_uppercase()) {
            let message = format!("unexpected character `{c}` (names and keywords are lowercase)");
            return Err(ExprError::at(self.pos, message));
        }
        Ok(Tok::Ident(name))
    }

    fn symbol(&mut self, pos: Pos, c: char) -> Result<Tok, ExprError> {
        let next = self.peek(1);
        let (sym, len): (&'static str, usize) = match (c, next) {
            ('=', Some('=')) => ("==", 2),
            ('!', Some('=')) => ("!=", 2),
            ('<', Some('=')) => ("<=", 2),
            ('>', Some('=')) => (">=", 2),
            ('<', _) => ("<", 1),
            ('>', _) => (">", 1),
            ('(', _) => ("(", 1),
            (')', _) => (")", 1),
            (',', _) => (",", 1),
            ('+', _) => ("+", 1),
            ('-', _) => ("-", 1),
            ('*', _) => ("*", 1),
            ('/', _) => ("/", 1),
            ('%', _) => ("%", 1),
            ('=', _) => return Err(ExprError::at(pos, "unexpected `=`; compare with `==`")),
            ('!', _) => return Err(ExprError::at(pos, "unexpected `!`; negate with `not`")),
            (c, _) if c.is_ascii_uppercase() => {
                let message = format!("unexpected character `{c}` (names and keywords are lowercase)");
                return Err(ExprError::at(pos, message));
            }
            (c, _) => {
                let message = format!("unexpected character `{}`", c.escape_debug());
                return Err(ExprError::at(pos, message));
            }
        };
        for _ in 0..len {
            self.bump();
        }
        Ok(Tok::Sym(sym))
    }
}
