//! The Dockerfile subset that moat template builds accept.
//!
//! [`parse`] reads a Dockerfile into a single-stage [`Dockerfile`]: its `FROM`
//! line and the build steps after it. Lexing follows Docker's rules (parser
//! directives, comments, line continuations, the escape character, JSON exec
//! form), so a Dockerfile written for `docker build` reads the same here.
//! Features that moat builds do not provide (multi-stage builds, heredocs,
//! `RUN --mount`, `ONBUILD`, `ADD` from URLs, ...) are refused with a message
//! that names the line and, where there is one, the way around it.
//!
//! Values are kept as [`Word`]s, unexpanded: the builder expands each one with
//! [`Word::expand`] once it knows the build arguments and environment in force
//! at that step.

use std::fmt;

use serde_json::Value;

/// The largest Dockerfile accepted, in bytes.
pub const MAX_DOCKERFILE_BYTES: usize = 1 << 20;

/// The most instructions a Dockerfile may hold, counting `FROM` and the `ARG`s before it.
pub const MAX_INSTRUCTIONS: usize = 256;

/// Longest a word may become once its variables are expanded.
pub const MAX_EXPANDED_BYTES: usize = 64 << 10;

/// How deeply `${...}` references may nest inside each other's default values.
const MAX_NESTING: usize = 32;

/// The longest piece of Dockerfile text quoted back in a message, in characters.
const QUOTE_LIMIT: usize = 60;

/// A Dockerfile that moat cannot build, and the line at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerfileError {
    /// The line (counting from 1) where the offending instruction starts, or 0
    /// when the problem concerns the file as a whole.
    pub line: usize,
    /// What is wrong and, where useful, what to do about it.
    pub message: String,
}

impl DockerfileError {
    fn new(line: usize, message: impl Into<String>) -> Self {
        DockerfileError {
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for DockerfileError {
    /// Shows `line N: message`, or only the message when it concerns the whole file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

impl std::error::Error for DockerfileError {}

/// A parsed Dockerfile: one `FROM` and the steps that follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// ARGs declared before FROM (usable in FROM only, per Docker rules).
    pub global_args: Vec<ArgDecl>,
    /// The FROM line.
    pub from: From,
    /// Instructions after FROM, in order.
    pub steps: Vec<Step>,
    /// Instructions that were accepted but have no effect in moat templates
    /// (`EXPOSE`, `VOLUME`, `STOPSIGNAL`, `HEALTHCHECK`, `MAINTAINER`), one
    /// message each, such as "line 4: `VOLUME` has no effect in moat templates".
    pub warnings: Vec<String>,
}

/// The `FROM [--platform=linux/amd64] image [AS name]` line.
///
/// `--platform` is accepted only when it names linux/amd64, the one platform
/// moat builds for; a stage name after `AS` is accepted and ignored, as there
/// is a single stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct From {
    /// The line the instruction starts on.
    pub line: usize,
    /// The base image reference, which may refer to ARGs declared before `FROM`.
    pub image: Word,
}

/// One build step: an instruction after `FROM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The line the instruction starts on.
    pub line: usize,
    /// The instruction as written, continuation lines joined into one line and
    /// surrounding blanks trimmed, for build logs.
    pub text: String,
    /// What the step does.
    pub instruction: Instruction,
}

/// A build instruction moat carries out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// `RUN`: a command run in the image being built.
    Run(Command),
    /// `COPY` or `ADD`: files copied from the build context.
    Copy(Copy),
    /// `ENV a=b c="d e"` or the legacy `ENV key value with spaces`: variables
    /// set for later steps and the template. Names are taken as written, with
    /// quotes removed.
    Env(Vec<(String, Word)>),
    /// `WORKDIR`: the working directory for later steps and the template.
    Workdir(Word),
    /// `USER`: the user (and optional group) for later steps and the template.
    User(Word),
    /// `ARG`: a build argument declared after `FROM`.
    Arg(ArgDecl),
    /// `CMD`: the template's default command.
    Cmd(Command),
    /// `ENTRYPOINT`: the template's entrypoint.
    Entrypoint(Command),
    /// `LABEL`: key/value metadata.
    Label(Vec<(Word, Word)>),
    /// `SHELL ["/bin/bash", "-c"]`: the shell that runs later shell-form commands.
    Shell(Vec<String>),
}

/// A command in shell form or exec form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Shell form: the text is handed to the shell as written.
    Shell(String),
    /// Exec form, written as a JSON array of strings: the program and its
    /// arguments, run without a shell.
    Exec(Vec<String>),
}

/// A `COPY` or `ADD` instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// True for `ADD` (which also unpacks local archives), false for `COPY`.
    pub add: bool,
    /// The paths to copy from the build context; never empty.
    pub sources: Vec<Word>,
    /// Where to copy them in the image.
    pub dest: Word,
    /// The `--chown=user:group` value, if given.
    pub chown: Option<Word>,
    /// The `--chmod=mode` value, if given.
    pub chmod: Option<Word>,
    /// The `--from=name` value of a `COPY`: a named build context the build was given (moat
    /// builds have no stages to copy from).
    pub from: Option<Word>,
}

/// An `ARG NAME` or `ARG NAME=default` declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// The argument's name: a letter or `_`, then letters, digits and `_`.
    pub name: String,
    /// The value used when the build does not set the argument.
    pub default: Option<Word>,
}

/// A word as written (quotes and `$` references intact), expanded at build
/// time once the variables it refers to are known.
///
/// The escape character inside a word is always `\`: words read from a
/// Dockerfile whose escape directive picks the backtick are rewritten to the
/// same meaning with `\` escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word(pub String);

impl Word {
    /// Removes quotes and expands variable references as Docker does, with
    /// `lookup` giving each variable's value (`None` when it is unset).
    ///
    /// - `'...'` is literal. `"..."` expands `$` references, and `\` inside it
    ///   escapes only `"`, `$` and `\`; before any other character it stays.
    /// - Outside quotes, `\` makes the next character literal: `\$` is a `$`.
    /// - `$NAME` and `${NAME}` expand to the value, or to nothing when unset.
    /// - `${NAME:-word}` gives `word` when NAME is unset or empty, and
    ///   `${NAME-word}` only when it is unset; `${NAME:+word}` gives `word` when
    ///   NAME is set and not empty, `${NAME+word}` whenever it is set, and
    ///   both give nothing otherwise. `word` may hold quotes and references
    ///   itself, nested up to 32 deep.
    /// - A `$` that starts no reference stays a literal `$`.
    /// - What a variable expands to is never expanded again.
    ///
    /// Returns a message for the user on an unterminated quote, a `${`
    /// without its `}`, a `${` not followed by a valid name, an operator other
    /// than those above (such as `${NAME?error}`) or deeper nesting.
    /// An expansion longer than [`MAX_EXPANDED_BYTES`] is an error, so variables that refer
    /// to each other cannot grow a word without bound.
    pub fn expand(&self, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
        let parts = parse_word(&self.0, '\\')?;
        let mut out = String::new();
        expand_parts(&parts, lookup, &mut out)?;
        Ok(out)
    }
}

/// Parses a Dockerfile into its `FROM` line and build steps.
///
/// Refuses, naming the line at fault: input over [`MAX_DOCKERFILE_BYTES`] or
/// holding a NUL byte; more than [`MAX_INSTRUCTIONS`] instructions; a missing
/// `FROM`, anything but `ARG` before it, or a second one; unknown
/// instructions, `ONBUILD` and heredocs; flags and forms that moat builds do
/// not support; and missing or malformed arguments, including words with an
/// unterminated quote or a bad `${...}` reference.
pub fn parse(text: &str) -> Result<Dockerfile, DockerfileError> {
    check_text(text)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (escape, lines) = logical_lines(text)?;
    if let Some(extra) = lines.get(MAX_INSTRUCTIONS) {
        return Err(DockerfileError::new(
            extra.number,
            format!(
                "the Dockerfile has more than {MAX_INSTRUCTIONS} instructions, the most a moat \
                 build accepts; combine steps, for example RUN commands joined with `&&`"
            ),
        ));
    }
    let mut builder = Builder::new(escape);
    for line in &lines {
        builder.add(line)?;
    }
    builder.finish()
}

// ---------------------------------------------------------------------------
// Lexing: physical lines into instructions.
// ---------------------------------------------------------------------------

/// One instruction: its first line number and its text with continuations joined.
struct LogicalLine {
    number: usize,
    text: String,
}

/// Refuses input that is too large or not text.
fn check_text(text: &str) -> Result<(), DockerfileError> {
    if text.len() > MAX_DOCKERFILE_BYTES {
        return Err(DockerfileError::new(
            0,
            format!(
                "the Dockerfile is {} bytes, over the limit of {MAX_DOCKERFILE_BYTES} bytes (1 MiB)",
                text.len()
            ),
        ));
    }
    match physical_lines(text).find(|(_, line)| line.contains('\0')) {
        Some((number, _)) => Err(DockerfileError::new(
            number,
            "the Dockerfile contains a NUL byte; it must be a text file",
        )),
        None => Ok(()),
    }
}

/// The file's lines, numbered from 1, with the `\r` of CRLF endings removed.
fn physical_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split('\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line.strip_suffix('\r').unwrap_or(line)))
}

/// Reads the parser directives and joins continued lines into instructions,
/// dropping comments and blank lines. Returns the escape character in force.
fn logical_lines(text: &str) -> Result<(char, Vec<LogicalLine>), DockerfileError> {
    let mut directives = Directives::default();
    let mut lines = physical_lines(text);
    let mut out = Vec::new();
    while let Some((number, raw)) = lines.next() {
        directives.read(number, raw)?;
        let escape = directives.escape;
        let first = trim_start_blank(raw);
        if first.starts_with('#') {
            continue;
        }
        let (start, mut continues) = strip_continuation(first, escape);
        let mut joined = start.to_owned();
        while continues {
            let Some((_, next)) = lines.next() else {
                break;
            };
            // Docker drops comments and blank lines inside a continued instruction.
            let content = trim_start_blank(next);
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let (part, more) = strip_continuation(next, escape);
            joined.push_str(part);
            continues = more;
        }
        let text = trim_blank(&joined);
        if !text.is_empty() {
            out.push(LogicalLine {
                number,
                text: text.to_owned(),
            });
        }
    }
    Ok((directives.escape, out))
}

/// Removes a trailing escape character (and blanks after it) that continues
/// the instruction on the next line; says whether it was there.
fn strip_continuation(line: &str, escape: char) -> (&str, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    match trimmed.strip_suffix(escape) {
        Some(body) => (body, true),
        None => (line, false),
    }
}

/// The parser directives read so far (`# escape=`, `# syntax=`, `# check=`).
struct Directives {
    escape: char,
    seen: Vec<String>,
    done: bool,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            escape: '\\',
            seen: Vec::new(),
            done: false,
        }
    }
}

impl Directives {
    /// Takes in one line from the top of the file. Directives end at the first
    /// line that is not one: a blank line, a plain comment, an unknown
    /// directive or an instruction.
    fn read(&mut self, number: usize, line: &str) -> Result<(), DockerfileError> {
        if self.done {
            return Ok(());
        }
        let Some((name, value)) = directive(line) else {
            self.done = true;
            return Ok(());
        };
        if !matches!(name.as_str(), "escape" | "syntax" | "check") {
            // Docker reads an unknown directive as a comment, and any directive after it too.
            self.done = true;
            return Ok(());
        }
        if self.seen.contains(&name) {
            return Err(DockerfileError::new(
                number,
                format!("the `{name}` parser directive is given more than once; keep only one"),
            ));
        }
        if name == "escape" {
            self.escape = match value {
                "\\" => '\\',
                "`" => '`',
                other => {
                    return Err(DockerfileError::new(
                        number,
                        format!(
                            "the escape directive accepts only a backslash or a backtick, not `{}`",
                            shorten(other)
                        ),
                    ));
                }
            };
        }
        self.seen.push(name);
        Ok(())
    }
}

/// Splits a `# name=value` line into its lowercased name and its value.
fn directive(line: &str) -> Option<(String, &str)> {
    let rest = trim_start_blank(trim_start_blank(line).strip_prefix('#')?);
    let end = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    let (name, rest) = rest.split_at_checked(end)?;
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let value = trim_blank(trim_start_blank(rest).strip_prefix('=')?);
    if value.is_empty() {
        return None;
    }
    Some((name.to_ascii_lowercase(), value))
}

/// Docker's blanks in instruction text: ASCII whitespace, vertical tab included.
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

fn trim_blank(s: &str) -> &str {
    s.trim_matches(is_blank)
}

fn trim_start_blank(s: &str) -> &str {
    s.trim_start_matches(is_blank)
}

/// Splits at the first run of blanks: the text before it and the text after it.
fn split_at_blank(s: &str) -> (&str, &str) {
    match s.find(is_blank) {
        Some(i) => {
            let (head, tail) = s.split_at_checked(i).unwrap_or((s, ""));
            (head, trim_start_blank(tail))
        }
        None => (s, ""),
    }
}

/// Splits off the first word of `s` (after leading blanks) as Docker splits
/// instruction arguments: blanks inside quotes or after the escape character
/// do not end a word. Returns the word as written and the rest, or `None`
/// when nothing but blanks is left.
fn next_word(s: &str, escape: char) -> Option<(&str, &str)> {
    let s = trim_start_blank(s);
    if s.is_empty() {
        return None;
    }
    let mut quote: Option<char> = None;
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match quote {
            None if is_blank(c) => return s.split_at_checked(i),
            None if c == '\'' || c == '"' => quote = Some(c),
            Some(q) if c == q => quote = None,
            // Nothing can be escaped inside single quotes.
            Some('\'') => {}
            _ if c == escape => {
                chars.next();
            }
            _ => {}
        }
    }
    Some((s, ""))
}

/// All the words of `s`, split as [`next_word`] does.
fn split_words(s: &str, escape: char) -> Vec<&str> {
    let mut words = Vec::new();
    let mut rest = s;
    while let Some((word, after)) = next_word(rest, escape) {
        words.push(word);
        rest = after;
    }
    words
}

/// Shortens user text quoted in a message, so that a huge line cannot flood it.
fn shorten(s: &str) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(QUOTE_LIMIT).collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}

// ---------------------------------------------------------------------------
// Instructions.
// ---------------------------------------------------------------------------

/// Every instruction Docker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keyword {
    From,
    Run,
    Cmd,
    Entrypoint,
    Copy,
    Add,
    Env,
    Arg,
    Workdir,
    User,
    Label,
    Shell,
    Expose,
    Volume,
    StopSignal,
    Healthcheck,
    Maintainer,
    Onbuild,
}

impl Keyword {
    /// Recognises an instruction keyword, in any letter case.
    fn from_text(word: &str) -> Option<Keyword> {
        Some(match word.to_ascii_lowercase().as_str() {
            "from" => Keyword::From,
            "run" => Keyword::Run,
            "cmd" => Keyword::Cmd,
            "entrypoint" => Keyword::Entrypoint,
            "copy" => Keyword::Copy,
            "add" => Keyword::Add,
            "env" => Keyword::Env,
            "arg" => Keyword::Arg,
            "workdir" => Keyword::Workdir,
            "user" => Keyword::User,
            "label" => Keyword::Label,
            "shell" => Keyword::Shell,
            "expose" => Keyword::Expose,
            "volume" => Keyword::Volume,
            "stopsignal" => Keyword::StopSignal,
            "healthcheck" => Keyword::Healthcheck,
            "maintainer" => Keyword::Maintainer,
            "onbuild" => Keyword::Onbuild,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Keyword::From => "FROM",
            Keyword::Run => "RUN",
            Keyword::Cmd => "CMD",
            Keyword::Entrypoint => "ENTRYPOINT",
            Keyword::Copy => "COPY",
            Keyword::Add => "ADD",
            Keyword::Env => "ENV",
            Keyword::Arg => "ARG",
            Keyword::Workdir => "WORKDIR",
            Keyword::User => "USER",
            Keyword::Label => "LABEL",
            Keyword::Shell => "SHELL",
            Keyword::Expose => "EXPOSE",
            Keyword::Volume => "VOLUME",
            Keyword::StopSignal => "STOPSIGNAL",
            Keyword::Healthcheck => "HEALTHCHECK",
            Keyword::Maintainer => "MAINTAINER",
            Keyword::Onbuild => "ONBUILD",
        }
    }

    /// How the instruction is written, for messages about missing arguments.
    fn usage(self) -> &'static str {
        match self {
            Keyword::From => "FROM image[:tag]",
            Keyword::Run => "RUN command",
            Keyword::Cmd => "CMD [\"program\", \"arg\"]",
            Keyword::Entrypoint => "ENTRYPOINT [\"program\", \"arg\"]",
            Keyword::Copy => "COPY source... /destination",
            Keyword::Add => "ADD source... /destination",
            Keyword::Env => "ENV NAME=value",
            Keyword::Arg => "ARG NAME[=default]",
            Keyword::Workdir => "WORKDIR /path",
            Keyword::User => "USER name[:group]",
            Keyword::Label => "LABEL key=value",
            Keyword::Shell => "SHELL [\"/bin/sh\", \"-c\"]",
            Keyword::Expose => "EXPOSE port",
            Keyword::Volume => "VOLUME /path",
            Keyword::StopSignal => "STOPSIGNAL signal",
            Keyword::Healthcheck => "HEALTHCHECK CMD command",
            Keyword::Maintainer => "MAINTAINER name",
            Keyword::Onbuild => "ONBUILD instruction",
        }
    }

    /// Instructions accepted for compatibility that change nothing in a template.
    fn has_no_effect(self) -> bool {
        matches!(
            self,
            Keyword::Expose
                | Keyword::Volume
                | Keyword::StopSignal
                | Keyword::Healthcheck
                | Keyword::Maintainer
        )
    }
}

/// The instruction being parsed, for its messages and its words.
#[derive(Clone, Copy)]
struct Cx {
    line: usize,
    keyword: Keyword,
    escape: char,
}

impl Cx {
    fn error(self, message: impl Into<String>) -> DockerfileError {
        DockerfileError::new(self.line, message)
    }

    fn missing_arguments(self) -> DockerfileError {
        self.error(format!(
            "`{}` is missing its arguments; write it as `{}`",
            self.keyword.name(),
            self.keyword.usage()
        ))
    }

    /// Refuses an instruction with nothing after its keyword and flags.
    fn require(self, args: &str) -> Result<&str, DockerfileError> {
        if args.is_empty() {
            Err(self.missing_arguments())
        } else {
            Ok(args)
        }
    }

    /// Checks a word's syntax now, so that mistakes are reported with their
    /// line, and stores it with `\` as its escape character.
    fn word(self, raw: &str) -> Result<Word, DockerfileError> {
        let parts = parse_word(raw, self.escape)
            .map_err(|e| self.error(format!("`{}`: {e}", self.keyword.name())))?;
        if self.escape == '\\' {
            Ok(Word(raw.to_owned()))
        } else {
            let mut text = String::new();
            render_parts(&parts, &mut text);
            Ok(Word(text))
        }
    }

    /// A word with its quotes removed and any variables expanded to nothing.
    fn literal(self, raw: &str) -> Result<String, DockerfileError> {
        let parts = parse_word(raw, self.escape)
            .map_err(|e| self.error(format!("`{}`: {e}", self.keyword.name())))?;
        let mut out = String::new();
        expand_parts(&parts, &|_| None, &mut out)
            .map_err(|e| self.error(format!("`{}`: {e}", self.keyword.name())))?;
        Ok(out)
    }
}

/// Collects instructions into a [`Dockerfile`] while checking their order.
struct Builder {
    escape: char,
    global_args: Vec<ArgDecl>,
    from: Option<From>,
    steps: Vec<Step>,
    warnings: Vec<String>,
}

impl Builder {
    fn new(escape: char) -> Self {
        Builder {
            escape,
            global_args: Vec::new(),
            from: None,
            steps: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn add(&mut self, line: &LogicalLine) -> Result<(), DockerfileError> {
        let (word, args) = split_at_blank(&line.text);
        let keyword = Keyword::from_text(word)
            .ok_or_else(|| DockerfileError::new(line.number, unknown_instruction(word)))?;
        let cx = Cx {
            line: line.number,
            keyword,
            escape: self.escape,
        };
        self.check_order(cx)?;
        if keyword.has_no_effect() {
            cx.require(args)?;
            self.warnings.push(format!(
                "line {}: `{}` has no effect in moat templates",
                line.number,
                keyword.name()
            ));
            return Ok(());
        }
        match keyword {
            Keyword::From => self.from = Some(parse_from(cx, args)?),
            Keyword::Arg if self.from.is_none() => self.global_args.push(parse_arg(cx, args)?),
            _ => self.steps.push(Step {
                line: line.number,
                text: line.text.clone(),
                instruction: parse_step(cx, args)?,
            }),
        }
        Ok(())
    }

    /// Refuses ONBUILD, anything but ARG before FROM, and a second FROM.
    fn check_order(&self, cx: Cx) -> Result<(), DockerfileError> {
        match (cx.keyword, &self.from) {
            (Keyword::Onbuild, _) => Err(cx.error(
                "`ONBUILD` is not supported by moat builds; write the instructions directly \
                 in the Dockerfile that uses them",
            )),
            (Keyword::From, Some(first)) => Err(cx.error(format!(
                "a second `FROM`: multi-stage builds are not supported by moat builds; keep \
                 the single stage that starts with the `FROM` on line {}",
                first.line
            ))),
            (Keyword::From | Keyword::Arg, None) => Ok(()),
            (keyword, None) => Err(cx.error(format!(
                "`{}` comes before `FROM`; a Dockerfile must start with `FROM image` (only \
                 `ARG` may come before it)",
                keyword.name()
            ))),
            (_, Some(_)) => Ok(()),
        }
    }

    fn finish(self) -> Result<Dockerfile, DockerfileError> {
        let from = self.from.ok_or_else(|| {
            DockerfileError::new(
                0,
                "the Dockerfile has no `FROM` instruction; start it with `FROM image`, such as \
                 `FROM alpine:3.20`",
            )
        })?;
        Ok(Dockerfile {
            global_args: self.global_args,
            from,
            steps: self.steps,
            warnings: self.warnings,
        })
    }
}

fn unknown_instruction(word: &str) -> String {
    format!(
        "unknown instruction `{}`; moat builds understand FROM, RUN, COPY, ADD, ENV, ARG, \
         WORKDIR, USER, CMD, ENTRYPOINT, LABEL and SHELL (if this line belongs to the \
         previous instruction, end that one with the escape character)",
        shorten(word)
    )
}

/// Parses an instruction that comes after `FROM`.
fn parse_step(cx: Cx, args: &str) -> Result<Instruction, DockerfileError> {
    match cx.keyword {
        Keyword::Run => parse_run(cx, args),
        Keyword::Copy => parse_copy(cx, false, args),
        Keyword::Add => parse_copy(cx, true, args),
        Keyword::Cmd => Ok(Instruction::Cmd(parse_command(cx, no_flags(cx, args)?)?)),
        Keyword::Entrypoint => Ok(Instruction::Entrypoint(parse_command(
            cx,
            no_flags(cx, args)?,
        )?)),
        Keyword::Env => parse_env(cx, no_flags(cx, args)?),
        Keyword::Label => parse_label(cx, no_flags(cx, args)?),
        Keyword::Arg => Ok(Instruction::Arg(parse_arg(cx, args)?)),
        Keyword::Workdir => Ok(Instruction::Workdir(cx.word(no_flags(cx, args)?)?)),
        Keyword::User => Ok(Instruction::User(cx.word(no_flags(cx, args)?)?)),
        Keyword::Shell => parse_shell(cx, no_flags(cx, args)?),
        // FROM, ONBUILD and the instructions without effect never reach here.
        _ => Err(unknown_step(cx)),
    }
}

fn unknown_step(cx: Cx) -> DockerfileError {
    cx.error(format!("`{}` cannot be used here", cx.keyword.name()))
}

// --- flags -----------------------------------------------------------------

/// A `--name` or `--name=value` flag before an instruction's arguments; the
/// value is as written.
struct Flag<'a> {
    name: &'a str,
    value: Option<&'a str>,
}

/// Takes the leading `--flag` words off an instruction's arguments, as Docker
/// does for every instruction (a lone `--` ends them).
fn split_flags(args: &str, escape: char) -> (Vec<Flag<'_>>, &str) {
    let mut flags = Vec::new();
    let mut rest = trim_blank(args);
    while rest.starts_with("--") {
        let Some((word, after)) = next_word(rest, escape) else {
            break;
        };
        rest = trim_start_blank(after);
        let body = word.strip_prefix("--").unwrap_or(word);
        if body.is_empty() {
            break;
        }
        flags.push(match body.split_once('=') {
            Some((name, value)) => Flag {
                name,
                value: Some(value),
            },
            None => Flag {
                name: body,
                value: None,
            },
        });
    }
    (flags, rest)
}

/// The arguments of an instruction that takes no flags, refusing flags and
/// empty arguments.
fn no_flags(cx: Cx, args: &str) -> Result<&str, DockerfileError> {
    let (flags, rest) = split_flags(args, cx.escape);
    if let Some(flag) = flags.first() {
        return Err(cx.error(format!(
            "`{}` takes no flags, but `--{}` was given",
            cx.keyword.name(),
            shorten(flag.name)
        )));
    }
    cx.require(rest)
}

fn unknown_flag(cx: Cx, flag: &Flag<'_>) -> DockerfileError {
    cx.error(format!(
        "`{}` has no flag `--{}`",
        cx.keyword.name(),
        shorten(flag.name)
    ))
}

/// The value of a flag that needs one.
fn flag_value<'a>(cx: Cx, flag: &Flag<'a>, example: &str) -> Result<&'a str, DockerfileError> {
    match flag.value {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(cx.error(format!(
            "`--{}` needs a value, as in `{} {example}`",
            flag.name,
            cx.keyword.name()
        ))),
    }
}

/// Stores a flag's value, refusing the flag a second time.
fn set_once<T>(
    cx: Cx,
    slot: &mut Option<T>,
    flag: &Flag<'_>,
    value: T,
) -> Result<(), DockerfileError> {
    if slot.is_some() {
        return Err(cx.error(format!(
            "`--{}` is given more than once; keep only one",
            flag.name
        )));
    }
    *slot = Some(value);
    Ok(())
}

// --- FROM and ARG ----------------------------------------------------------

fn parse_from(cx: Cx, args: &str) -> Result<From, DockerfileError> {
    let (flags, rest) = split_flags(args, cx.escape);
    let mut platform = None;
    for flag in &flags {
        if flag.name != "platform" {
            return Err(unknown_flag(cx, flag));
        }
        let value = flag_value(cx, flag, "--platform=linux/amd64 image")?;
        check_platform(cx, value)?;
        set_once(cx, &mut platform, flag, ())?;
    }
    let words = split_words(cx.require(rest)?, cx.escape);
    let image = match words.as_slice() {
        [image] => *image,
        // A stage name is harmless with a single stage.
        [image, as_word, _name] if as_word.eq_ignore_ascii_case("as") => *image,
        _ => {
            return Err(cx.error(
                "`FROM` takes an image and an optional `AS name`, as in `FROM alpine:3.20 AS base`",
            ));
        }
    };
    Ok(From {
        line: cx.line,
        image: cx.word(image)?,
    })
}

/// Accepts `--platform` only when it names linux/amd64, the platform moat
/// builds for (the values of BUILDPLATFORM and TARGETPLATFORM there).
fn check_platform(cx: Cx, value: &str) -> Result<(), DockerfileError> {
    const PREDEFINED: [&str; 4] = [
        "$BUILDPLATFORM",
        "${BUILDPLATFORM}",
        "$TARGETPLATFORM",
        "${TARGETPLATFORM}",
    ];
    let literal = !value.contains('$') && cx.literal(value).ok().as_deref() == Some("linux/amd64");
    if literal || PREDEFINED.contains(&value) {
        return Ok(());
    }
    Err(cx.error(format!(
        "`FROM --platform={}` is not supported: moat builds only linux/amd64 images; remove \
         `--platform` or set it to `linux/amd64`",
        shorten(value)
    )))
}

fn parse_arg(cx: Cx, args: &str) -> Result<ArgDecl, DockerfileError> {
    let words = split_words(no_flags(cx, args)?, cx.escape);
    let declaration = match words.as_slice() {
        [one] => *one,
        _ => {
            return Err(cx.error(
                "`ARG` declares one variable per line in moat builds; put each on its own \
                 `ARG` line",
            ));
        }
    };
    let (name, default) = match declaration.split_once('=') {
        Some((name, default)) => (name, Some(cx.word(default)?)),
        None => (declaration, None),
    };
    if !is_name(name) {
        return Err(cx.error(format!(
            "`{}` is not a valid ARG name: use letters, digits and `_`, starting with a \
             letter or `_`",
            shorten(name)
        )));
    }
    Ok(ArgDecl {
        name: name.to_owned(),
        default,
    })
}

/// Whether `s` is `[A-Za-z_][A-Za-z0-9_]*`.
fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

// --- RUN, CMD, ENTRYPOINT, SHELL -------------------------------------------

/// What an instruction's arguments are as JSON.
enum JsonArgs {
    /// A JSON array of strings: exec form.
    Strings(Vec<String>),
    /// A JSON array holding something other than strings.
    NotStrings,
    /// Not a JSON array at all.
    NotJson,
}

fn json_args(args: &str) -> JsonArgs {
    if !args.starts_with('[') {
        return JsonArgs::NotJson;
    }
    // serde_json limits nesting depth, so a deeply nested array is just invalid JSON.
    let Ok(values) = serde_json::from_str::<Vec<Value>>(args) else {
        return JsonArgs::NotJson;
    };
    values
        .into_iter()
        .map(|value| match value {
            Value::String(s) => Some(s),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .map_or(JsonArgs::NotStrings, JsonArgs::Strings)
}

/// Refuses exec-form strings holding NUL, which no program argument or path can hold.
fn check_no_nul(cx: Cx, strings: Vec<String>) -> Result<Vec<String>, DockerfileError> {
    if strings.iter().any(|s| s.contains('\0')) {
        return Err(cx.error(format!(
            "`{}` has a NUL character (`\\u0000`) in its JSON array, which no argument or \
             path can hold",
            cx.keyword.name()
        )));
    }
    Ok(strings)
}

/// Exec form when the arguments are a JSON array of strings, shell form otherwise.
fn parse_command(cx: Cx, args: &str) -> Result<Command, DockerfileError> {
    match json_args(args) {
        JsonArgs::Strings(strings) => Ok(Command::Exec(check_no_nul(cx, strings)?)),
        // Anything else runs through the shell as written.
        JsonArgs::NotStrings | JsonArgs::NotJson => Ok(Command::Shell(args.to_owned())),
    }
}

fn parse_run(cx: Cx, args: &str) -> Result<Instruction, DockerfileError> {
    let (flags, rest) = split_flags(args, cx.escape);
    if let Some(flag) = flags.first() {
        return Err(match flag.name {
            "mount" => cx.error(
                "`RUN --mount` (cache, secret and bind mounts) is not supported by moat \
                 builds; remove it, and COPY any files the step needs",
            ),
            "network" | "security" => cx.error(format!(
                "`RUN --{}` is not supported by moat builds; remove the flag",
                flag.name
            )),
            _ => unknown_flag(cx, flag),
        });
    }
    let command = parse_command(cx, cx.require(rest)?)?;
    match &command {
        Command::Exec(argv) if argv.is_empty() => {
            return Err(cx.error("`RUN []` has no command to run; name the program to run"));
        }
        Command::Shell(text) => refuse_heredocs(cx, &split_words(text, cx.escape))?,
        Command::Exec(_) => {}
    }
    Ok(Instruction::Run(command))
}

/// Refuses heredocs (`<<EOF`, `<<-EOF`, `<<"EOF"`), recognised as Docker does:
/// a word that starts with `<<`, after optional digits.
fn refuse_heredocs(cx: Cx, words: &[&str]) -> Result<(), DockerfileError> {
    match words.iter().find(|word| is_heredoc(word)) {
        Some(word) => Err(cx.error(format!(
            "heredocs (`{}`) are not supported by moat builds; put the content in a file in \
             the build context and COPY it, or write the command on continued lines",
            shorten(word)
        ))),
        None => Ok(()),
    }
}

fn is_heredoc(word: &str) -> bool {
    let word = word.trim_start_matches(|c: char| c.is_ascii_digit());
    let Some(rest) = word.strip_prefix("<<") else {
        return false;
    };
    let rest = trim_start_blank(rest.strip_prefix('-').unwrap_or(rest));
    // `<<<` is a shell here-string, not a heredoc.
    !rest.is_empty() && !rest.contains('<')
}

fn parse_shell(cx: Cx, args: &str) -> Result<Instruction, DockerfileError> {
    match json_args(args) {
        JsonArgs::Strings(strings) if strings.is_empty() => {
            Err(cx.error("`SHELL []` names no shell; write it as `SHELL [\"/bin/sh\", \"-c\"]`"))
        }
        JsonArgs::Strings(strings) => Ok(Instruction::Shell(check_no_nul(cx, strings)?)),
        JsonArgs::NotStrings => Err(cx
            .error("`SHELL` takes a JSON array of strings, as in `SHELL [\"/bin/bash\", \"-c\"]`")),
        JsonArgs::NotJson => Err(
            cx.error("`SHELL` must be written in JSON form, as in `SHELL [\"/bin/bash\", \"-c\"]`")
        ),
    }
}

// --- COPY and ADD ----------------------------------------------------------

fn parse_copy(cx: Cx, add: bool, args: &str) -> Result<Instruction, DockerfileError> {
    let (flags, rest) = split_flags(args, cx.escape);
    let mut chown = None;
    let mut chmod = None;
    let mut from = None;
    for flag in &flags {
        match flag.name {
            "chown" => {
                let value = cx.word(flag_value(cx, flag, "--chown=user:group src /dest")?)?;
                set_once(cx, &mut chown, flag, value)?;
            }
            "chmod" => {
                let value = cx.word(flag_value(cx, flag, "--chmod=644 src /dest")?)?;
                set_once(cx, &mut chmod, flag, value)?;
            }
            "from" if !add => {
                let value = cx.word(flag_value(cx, flag, "--from=context src /dest")?)?;
                set_once(cx, &mut from, flag, value)?;
            }
            _ => return Err(copy_flag_error(cx, add, flag)),
        }
    }
    let rest = cx.require(rest)?;
    let raw: Vec<String> = match json_args(rest) {
        JsonArgs::Strings(strings) => check_no_nul(cx, strings)?,
        JsonArgs::NotStrings => {
            return Err(cx.error(format!(
                "`{0}` in JSON form takes only strings, as in `{0} [\"src\", \"/dest\"]`",
                cx.keyword.name()
            )));
        }
        JsonArgs::NotJson => {
            let words = split_words(rest, cx.escape);
            refuse_heredocs(cx, &words)?;
            words.into_iter().map(str::to_owned).collect()
        }
    };
    let Some((dest, sources)) = raw.split_last() else {
        return Err(cx.missing_arguments());
    };
    if sources.is_empty() {
        return Err(cx.error(format!(
            "`{}` needs at least one source and a destination, as in `{}`",
            cx.keyword.name(),
            cx.keyword.usage()
        )));
    }
    if add {
        sources
            .iter()
            .try_for_each(|source| refuse_remote(cx, source))?;
    }
    Ok(Instruction::Copy(Copy {
        add,
        sources: sources
            .iter()
            .map(|source| cx.word(source))
            .collect::<Result<_, _>>()?,
        dest: cx.word(dest)?,
        chown,
        chmod,
        from,
    }))
}

/// Says why a COPY or ADD flag other than `--chown` and `--chmod` is refused.
fn copy_flag_error(cx: Cx, add: bool, flag: &Flag<'_>) -> DockerfileError {
    let name = cx.keyword.name();
    match (flag.name, add) {
        ("link", _) => cx.error(format!(
            "`{name} --link` is not supported by moat builds; remove the flag"
        )),
        ("exclude", _) => cx.error(format!(
            "`{name} --exclude` is not supported by moat builds; list only the sources to copy"
        )),
        ("parents", false) => cx.error(
            "`COPY --parents` is not supported by moat builds; copy each directory to its \
             full destination path instead",
        ),
        ("checksum", true) => cx.error(
            "`ADD --checksum` is not supported by moat builds, as ADD from URLs is not: \
             download in a RUN step and check the file there",
        ),
        ("keep-git-dir", true) => cx.error(
            "`ADD --keep-git-dir` is not supported by moat builds, as ADD from git \
             repositories is not: clone the repository in a RUN step",
        ),
        _ => unknown_flag(cx, flag),
    }
}

/// Refuses ADD sources that Docker would fetch: URLs and git repositories.
fn refuse_remote(cx: Cx, source: &str) -> Result<(), DockerfileError> {
    let bare = source.trim_matches(|c| c == '"' || c == '\'');
    if source.contains("://") {
        return Err(cx.error(format!(
            "ADD from URLs is not supported (`{}`): download in a RUN step",
            shorten(source)
        )));
    }
    if bare.starts_with("git@") || bare.starts_with("github.com/") {
        return Err(cx.error(format!(
            "ADD from git repositories is not supported (`{}`): clone it in a RUN step",
            shorten(source)
        )));
    }
    Ok(())
}

// --- ENV and LABEL ---------------------------------------------------------

fn parse_env(cx: Cx, args: &str) -> Result<Instruction, DockerfileError> {
    let mut env = Vec::new();
    for (key, value) in key_value_pairs(cx, args)? {
        if key.contains('$') {
            return Err(cx.error(format!(
                "the variable name `{}` in `ENV` cannot contain `$`: names are taken as written",
                shorten(key)
            )));
        }
        let name = cx.literal(key)?;
        if name.is_empty() {
            return Err(cx.error("`ENV` has an empty variable name; write it as `ENV NAME=value`"));
        }
        env.push((name, cx.word(value)?));
    }
    Ok(Instruction::Env(env))
}

fn parse_label(cx: Cx, args: &str) -> Result<Instruction, DockerfileError> {
    let mut labels = Vec::new();
    for (key, value) in key_value_pairs(cx, args)? {
        if !key.contains('$') && cx.literal(key)?.is_empty() {
            return Err(cx.error("`LABEL` has an empty key; write it as `LABEL key=value`"));
        }
        labels.push((cx.word(key)?, cx.word(value)?));
    }
    Ok(Instruction::Label(labels))
}

/// Splits ENV or LABEL arguments into keys and values, as written. Docker
/// tells the two forms apart by the first word: with `=` it is `k=v k2=v2`,
/// where a quoted or escaped value may hold blanks and `=`; without, it is the
/// legacy `key value`, where everything after the key is the value.
fn key_value_pairs(cx: Cx, args: &str) -> Result<Vec<(&str, &str)>, DockerfileError> {
    let words = split_words(args, cx.escape);
    let Some(first) = words.first() else {
        return Err(cx.missing_arguments());
    };
    if !first.contains('=') {
        let (key, value) = split_at_blank(args);
        if value.is_empty() {
            return Err(cx.error(format!(
                "`{0} {1}` has no value; write it as `{0} {1}=value`",
                cx.keyword.name(),
                shorten(key)
            )));
        }
        return Ok(vec![(key, value)]);
    }
    words
        .into_iter()
        .map(|word| {
            word.split_once('=').ok_or_else(|| {
                cx.error(format!(
                    "`{}` in `{}` is not of the form `name=value`; quote values that hold \
                     blanks",
                    shorten(word),
                    cx.keyword.name()
                ))
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Words: quote removal and variable expansion.
// ---------------------------------------------------------------------------

/// A word broken into literal text and variable references.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var {
        name: String,
        alternative: Option<(Modifier, Vec<Part>)>,
    },
}

/// The operator of `${NAME<op>word}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Modifier {
    /// `:-`: the word when the variable is unset or empty.
    DefaultIfEmpty,
    /// `-`: the word when the variable is unset.
    DefaultIfUnset,
    /// `:+`: the word when the variable is set and not empty.
    AlternativeIfNonEmpty,
    /// `+`: the word when the variable is set.
    AlternativeIfSet,
}

impl Modifier {
    fn symbol(self) -> &'static str {
        match self {
            Modifier::DefaultIfEmpty => ":-",
            Modifier::DefaultIfUnset => "-",
            Modifier::AlternativeIfNonEmpty => ":+",
            Modifier::AlternativeIfSet => "+",
        }
    }
}

const MISSING_BRACE: &str = "`${` has no matching `}`";

/// Parses a word written with `escape` as its escape character, naming the
/// word in any error.
fn parse_word(text: &str, escape: char) -> Result<Vec<Part>, String> {
    let mut parser = WordParser {
        chars: text.chars().peekable(),
        escape,
    };
    parser
        .sequence(0, false)
        .map_err(|e| format!("{e} in `{}`", shorten(text)))
}

/// A recursive-descent reader of Docker's word syntax. Recursion happens only
/// through `${`, which is limited to [`MAX_NESTING`] levels.
struct WordParser<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    escape: char,
}

impl WordParser<'_> {
    /// Reads unquoted text up to the end, or up to the `}` closing a
    /// `${NAME:-...}` when `in_braces`.
    fn sequence(&mut self, depth: usize, in_braces: bool) -> Result<Vec<Part>, String> {
        let mut parts = Vec::new();
        while let Some(c) = self.chars.next() {
            match c {
                '}' if in_braces => return Ok(parts),
                '\'' => self.single_quoted(&mut parts)?,
                '"' => self.double_quoted(depth, &mut parts)?,
                '$' => {
                    let part = self.dollar(depth)?;
                    push_part(&mut parts, part);
                }
                _ if c == self.escape => match self.chars.next() {
                    Some(escaped) => push_char(&mut parts, escaped),
                    // Docker ignores an escape character at the very end.
                    None => break,
                },
                _ => push_char(&mut parts, c),
            }
        }
        if in_braces {
            Err(MISSING_BRACE.to_owned())
        } else {
            Ok(parts)
        }
    }

    /// Reads the rest of a '…' string: everything up to the next `'` is literal.
    fn single_quoted(&mut self, parts: &mut Vec<Part>) -> Result<(), String> {
        loop {
            match self.chars.next() {
                Some('\'') => return Ok(()),
                Some(c) => push_char(parts, c),
                None => return Err("unterminated single quote".to_owned()),
            }
        }
    }

    /// Reads the rest of a "…" string: `$` references expand, and the escape
    /// character escapes only `"`, `$` and itself.
    fn double_quoted(&mut self, depth: usize, parts: &mut Vec<Part>) -> Result<(), String> {
        loop {
            match self.chars.next() {
                Some('"') => return Ok(()),
                Some('$') => {
                    let part = self.dollar(depth)?;
                    push_part(parts, part);
                }
                Some(c) if c == self.escape => match self.chars.peek().copied() {
                    Some(next) if next == '"' || next == '$' || next == self.escape => {
                        self.chars.next();
                        push_char(parts, next);
                    }
                    _ => push_char(parts, c),
                },
                Some(c) => push_char(parts, c),
                None => return Err("unterminated double quote".to_owned()),
            }
        }
    }

    /// Reads what follows a `$`.
    fn dollar(&mut self, depth: usize) -> Result<Part, String> {
        if self.chars.peek() != Some(&'{') {
            let name = self.name();
            return Ok(if name.is_empty() {
                // A `$` that starts no reference is literal.
                Part::Text("$".to_owned())
            } else {
                Part::Var {
                    name,
                    alternative: None,
                }
            });
        }
        self.chars.next();
        let depth = depth + 1;
        if depth > MAX_NESTING {
            return Err(format!(
                "`${{...}}` references are nested more than {MAX_NESTING} deep"
            ));
        }
        let name = self.name();
        if name.is_empty() {
            return Err(match self.chars.peek() {
                None => MISSING_BRACE.to_owned(),
                Some(_) => bad_substitution(),
            });
        }
        let modifier = match self.chars.next() {
            Some('}') => {
                return Ok(Part::Var {
                    name,
                    alternative: None,
                });
            }
            Some(':') => match self.chars.next() {
                Some('-') => Modifier::DefaultIfEmpty,
                Some('+') => Modifier::AlternativeIfNonEmpty,
                Some(other) => return Err(unsupported_substitution(&name, &format!(":{other}"))),
                None => return Err(MISSING_BRACE.to_owned()),
            },
            Some('-') => Modifier::DefaultIfUnset,
            Some('+') => Modifier::AlternativeIfSet,
            Some(other @ ('?' | '#' | '%' | '/' | '^' | ',' | '@')) => {
                return Err(unsupported_substitution(&name, &other.to_string()));
            }
            Some(_) => return Err(bad_substitution()),
            None => return Err(MISSING_BRACE.to_owned()),
        };
        let word = self.sequence(depth, true)?;
        Ok(Part::Var {
            name,
            alternative: Some((modifier, word)),
        })
    }

    /// Reads a variable name: `[A-Za-z_][A-Za-z0-9_]*`, or a run of digits
    /// (a positional parameter, which is never set in a build).
    fn name(&mut self) -> String {
        let digits = self.chars.peek().is_some_and(char::is_ascii_digit);
        let mut name = String::new();
        while let Some(&c) = self.chars.peek() {
            let fits = if digits {
                c.is_ascii_digit()
            } else {
                c.is_ascii_alphanumeric() || c == '_'
            };
            if !fits {
                break;
            }
            name.push(c);
            self.chars.next();
        }
        name
    }
}

fn bad_substitution() -> String {
    "bad substitution: `${` must be followed by a variable name (letters, digits and `_`) \
     and then `}`, `:-`, `:+`, `-` or `+`"
        .to_owned()
}

fn unsupported_substitution(name: &str, operator: &str) -> String {
    format!(
        "`${{{name}{operator}...}}` is not supported; use `${{{name}}}`, \
         `${{{name}:-default}}` or `${{{name}:+alternative}}`"
    )
}

fn push_char(parts: &mut Vec<Part>, c: char) {
    match parts.last_mut() {
        Some(Part::Text(text)) => text.push(c),
        _ => parts.push(Part::Text(c.to_string())),
    }
}

/// Appends a part, merging adjacent text.
fn push_part(parts: &mut Vec<Part>, part: Part) {
    match (parts.last_mut(), part) {
        (Some(Part::Text(text)), Part::Text(more)) => text.push_str(&more),
        (_, part) => parts.push(part),
    }
}

/// Expands parsed parts; what a variable expands to is never looked at again.
fn expand_parts(
    parts: &[Part],
    lookup: &dyn Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), String> {
    for part in parts {
        if out.len() > MAX_EXPANDED_BYTES {
            return Err(format!(
                "a word expands to more than {MAX_EXPANDED_BYTES} bytes"
            ));
        }
        match part {
            Part::Text(text) => out.push_str(text),
            Part::Var {
                name,
                alternative: None,
            } => out.push_str(&lookup(name).unwrap_or_default()),
            Part::Var {
                name,
                alternative: Some((modifier, word)),
            } => {
                let value = lookup(name);
                let non_empty = value.as_deref().is_some_and(|v| !v.is_empty());
                let use_word = match modifier {
                    Modifier::DefaultIfEmpty => !non_empty,
                    Modifier::DefaultIfUnset => value.is_none(),
                    Modifier::AlternativeIfNonEmpty => non_empty,
                    Modifier::AlternativeIfSet => value.is_some(),
                };
                let is_default = matches!(
                    modifier,
                    Modifier::DefaultIfEmpty | Modifier::DefaultIfUnset
                );
                if use_word {
                    expand_parts(word, lookup, out)?;
                } else if is_default {
                    out.push_str(value.as_deref().unwrap_or_default());
                }
            }
        }
    }
    if out.len() > MAX_EXPANDED_BYTES {
        return Err(format!(
            "a word expands to more than {MAX_EXPANDED_BYTES} bytes"
        ));
    }
    Ok(())
}

/// Writes parsed parts back as word text with `\` as the escape character.
fn render_parts(parts: &[Part], out: &mut String) {
    for part in parts {
        match part {
            Part::Text(text) => {
                for c in text.chars() {
                    if matches!(c, '\\' | '\'' | '"' | '$' | '}') {
                        out.push('\\');
                    }
                    out.push(c);
                }
            }
            Part::Var { name, alternative } => {
                out.push_str("${");
                out.push_str(name);
                if let Some((modifier, word)) = alternative {
                    out.push_str(modifier.symbol());
                    render_parts(word, out);
                }
                out.push('}');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(src: &str) -> Dockerfile {
        match parse(src) {
            Ok(dockerfile) => dockerfile,
            Err(e) => panic!("{src:?} should parse, got: {e}"),
        }
    }

    fn refused(src: &str) -> DockerfileError {
        match parse(src) {
            Ok(dockerfile) => panic!("{src:?} should be refused, got {dockerfile:?}"),
            Err(e) => e,
        }
    }

    /// Asserts that `src` is refused on `line` with a message containing `needle`.
    fn assert_refused(src: &str, line: usize, needle: &str) {
        let e = refused(src);
        assert_eq!(e.line, line, "{src:?}: {e}");
        assert!(
            e.message.contains(needle),
            "{src:?}: {e:?} lacks {needle:?}"
        );
    }

    /// The single instruction of `FROM base` followed by `line`.
    fn step(line: &str) -> Instruction {
        let mut dockerfile = parsed(&format!("FROM base\n{line}\n"));
        assert_eq!(dockerfile.steps.len(), 1, "{line:?}: {dockerfile:?}");
        match dockerfile.steps.pop() {
            Some(step) => step.instruction,
            None => panic!("no step"),
        }
    }

    /// Asserts that `FROM base` followed by `line` is refused on line 2 with `needle`.
    fn assert_step_refused(line: &str, needle: &str) {
        assert_refused(&format!("FROM base\n{line}\n"), 2, needle);
    }

    fn w(s: &str) -> Word {
        Word(s.to_owned())
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn expand(word: &str, vars: &[(&str, &str)]) -> Result<String, String> {
        let lookup = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        };
        Word(word.to_owned()).expand(&lookup)
    }

    fn expands_to(word: &str, vars: &[(&str, &str)], want: &str) {
        assert_eq!(expand(word, vars), Ok(want.to_owned()), "{word:?}");
    }

    fn expand_error(word: &str) -> String {
        match expand(word, &[]) {
            Ok(out) => panic!("{word:?} should not expand, got {out:?}"),
            Err(e) => e,
        }
    }

    // --- FROM and the overall shape -----------------------------------------

    #[test]
    fn minimal_dockerfile() {
        let dockerfile = parsed("FROM alpine:3.20\n");
        assert_eq!(
            dockerfile,
            Dockerfile {
                global_args: vec![],
                from: From {
                    line: 1,
                    image: w("alpine:3.20"),
                },
                steps: vec![],
                warnings: vec![],
            }
        );
    }

    #[test]
    fn from_with_stage_name_and_platform() {
        let dockerfile = parsed("FROM --platform=linux/amd64 ubuntu:24.04 AS build\n");
        assert_eq!(dockerfile.from.image, w("ubuntu:24.04"));
        assert_eq!(parsed("from ubuntu as build").from.image, w("ubuntu"));
        assert_eq!(
            parsed("FROM --platform=\"linux/amd64\" x").from.image,
            w("x")
        );
        assert_eq!(
            parsed("FROM --platform=$BUILDPLATFORM x").from.image,
            w("x")
        );
        assert_eq!(
            parsed("FROM --platform=${TARGETPLATFORM} x").from.image,
            w("x")
        );
    }

    #[test]
    fn from_refusals() {
        assert_refused("FROM --platform=linux/arm64 x", 1, "only linux/amd64");
        assert_refused("FROM --platform=$OTHER x", 1, "only linux/amd64");
        assert_refused("FROM --platform x", 1, "needs a value");
        assert_refused(
            "FROM --platform=linux/amd64 --platform=linux/amd64 x",
            1,
            "more than once",
        );
        assert_refused("FROM --foo=bar x", 1, "no flag `--foo`");
        assert_refused("FROM", 1, "missing its arguments");
        assert_refused("FROM a b", 1, "optional `AS name`");
        assert_refused("FROM a AS", 1, "optional `AS name`");
        assert_refused("FROM a AS b c", 1, "optional `AS name`");
        assert_refused("FROM ${", 1, "no matching `}`");
    }

    #[test]
    fn global_args_before_from() {
        let dockerfile = parsed("ARG TAG=3.20\nARG BASE\nFROM alpine:${TAG}\nARG TAG\n");
        assert_eq!(
            dockerfile.global_args,
            vec![
                ArgDecl {
                    name: "TAG".into(),
                    default: Some(w("3.20")),
                },
                ArgDecl {
                    name: "BASE".into(),
                    default: None,
                },
            ]
        );
        assert_eq!(dockerfile.from.line, 3);
        assert_eq!(dockerfile.from.image, w("alpine:${TAG}"));
        assert_eq!(
            dockerfile.steps,
            vec![Step {
                line: 4,
                text: "ARG TAG".into(),
                instruction: Instruction::Arg(ArgDecl {
                    name: "TAG".into(),
                    default: None,
                }),
            }]
        );
        let vars = |name: &str| (name == "TAG").then(|| "3.20".to_owned());
        assert_eq!(
            dockerfile.from.image.expand(&vars),
            Ok("alpine:3.20".into())
        );
    }

    #[test]
    fn no_from_is_refused_for_the_whole_file() {
        for src in [
            "",
            "\n\n",
            "# just a comment\n",
            "   \n\t\n",
            "ARG A=1\n",
            "\\",
        ] {
            assert_refused(src, 0, "no `FROM` instruction");
        }
    }

    #[test]
    fn instructions_before_from_are_refused() {
        assert_refused("# c\nRUN true\nFROM x\n", 2, "`RUN` comes before `FROM`");
        assert_refused("ARG A\nENV A=1\nFROM x", 2, "`ENV` comes before `FROM`");
        assert_refused("EXPOSE 80\nFROM x", 1, "`EXPOSE` comes before `FROM`");
    }

    #[test]
    fn second_from_is_refused() {
        let e = refused("FROM a AS build\nRUN make\n\nFROM b\nCOPY --from=build /x /x\n");
        assert_eq!(e.line, 4);
        assert!(
            e.message.contains("multi-stage builds are not supported"),
            "{e}"
        );
        assert!(e.message.contains("line 1"), "{e}");
    }

    #[test]
    fn keywords_are_case_insensitive() {
        let dockerfile = parsed("from a\nrun echo hi\nCoPy x /y\nwOrKdIr /w\n");
        let steps: Vec<_> = dockerfile
            .steps
            .into_iter()
            .map(|s| s.instruction)
            .collect();
        assert_eq!(
            steps,
            vec![
                Instruction::Run(Command::Shell("echo hi".into())),
                Instruction::Copy(Copy {
                    add: false,
                    sources: vec![w("x")],
                    dest: w("/y"),
                    chown: None,
                    chmod: None,
                    from: None,
                }),
                Instruction::Workdir(w("/w")),
            ]
        );
    }

    #[test]
    fn unknown_and_onbuild_instructions_are_refused() {
        assert_step_refused("FROBNICATE now", "unknown instruction `FROBNICATE`");
        assert_step_refused("apt-get install -y curl", "unknown instruction `apt-get`");
        assert_refused("FROBNICATE\nFROM x", 1, "unknown instruction `FROBNICATE`");
        assert_step_refused("ONBUILD RUN make", "`ONBUILD` is not supported");
        assert_refused("ONBUILD RUN make\nFROM x", 1, "`ONBUILD` is not supported");
    }

    #[test]
    fn missing_arguments_are_refused() {
        for keyword in [
            "RUN",
            "CMD",
            "ENTRYPOINT",
            "COPY",
            "ADD",
            "ENV",
            "ARG",
            "WORKDIR",
            "USER",
            "LABEL",
            "SHELL",
            "EXPOSE",
            "VOLUME",
            "STOPSIGNAL",
            "HEALTHCHECK",
            "MAINTAINER",
        ] {
            assert_step_refused(keyword, "missing its arguments");
            assert_step_refused(&format!("{keyword}   \t"), "missing its arguments");
        }
        assert_step_refused("COPY --chown=a:b", "missing its arguments");
        assert_step_refused("RUN --", "missing its arguments");
    }

    #[test]
    fn step_text_and_line_numbers() {
        let dockerfile = parsed("FROM a\n\n  RUN   echo   hi  \n# c\nENV A=1\n");
        let lines: Vec<_> = dockerfile
            .steps
            .iter()
            .map(|s| (s.line, s.text.as_str()))
            .collect();
        assert_eq!(lines, vec![(3, "RUN   echo   hi"), (5, "ENV A=1")]);
    }

    // --- RUN, CMD, ENTRYPOINT, SHELL ----------------------------------------

    #[test]
    fn run_shell_and_exec_forms() {
        assert_eq!(
            step("RUN apt-get update && apt-get install -y curl"),
            Instruction::Run(Command::Shell(
                "apt-get update && apt-get install -y curl".into()
            ))
        );
        assert_eq!(
            step(r#"RUN ["/bin/sh", "-c", "echo \"hi\" $HOME"]"#),
            Instruction::Run(Command::Exec(strings(&[
                "/bin/sh",
                "-c",
                "echo \"hi\" $HOME"
            ])))
        );
        // A shell-form command keeps its quotes and `$` for the shell.
        assert_eq!(
            step("RUN echo \"$HOME\" '${X:-y}'"),
            Instruction::Run(Command::Shell("echo \"$HOME\" '${X:-y}'".into()))
        );
    }

    #[test]
    fn invalid_json_falls_back_to_shell_form() {
        for args in [
            "[\"a\", \"b\"",
            "[a, b]",
            "['single', 'quotes']",
            "[\"a\"] trailing",
            "[1, 2]",
            "[\"a\", null]",
            "[[\"nested\"]]",
            "[bash]",
        ] {
            for keyword in ["RUN", "CMD", "ENTRYPOINT"] {
                let want = Command::Shell(args.to_owned());
                let got = step(&format!("{keyword} {args}"));
                let ok = matches!(
                    &got,
                    Instruction::Run(c) | Instruction::Cmd(c) | Instruction::Entrypoint(c)
                        if *c == want
                );
                assert!(ok, "{keyword} {args}: {got:?}");
            }
        }
    }

    #[test]
    fn deeply_nested_json_is_shell_form_not_a_crash() {
        let args = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(
            step(&format!("CMD {args}")),
            Instruction::Cmd(Command::Shell(args))
        );
    }

    #[test]
    fn run_refusals() {
        assert_step_refused("RUN []", "no command to run");
        assert_step_refused(
            "RUN --mount=type=cache,target=/root/.cache pip install x",
            "`RUN --mount`",
        );
        assert_step_refused(
            "RUN --network=none make",
            "`RUN --network` is not supported",
        );
        assert_step_refused(
            "RUN --security=insecure make",
            "`RUN --security` is not supported",
        );
        assert_step_refused("RUN --frobnicate make", "`RUN` has no flag `--frobnicate`");
        assert_step_refused(r#"RUN ["a\u0000b"]"#, "NUL");
    }

    #[test]
    fn run_flag_list_ends_at_double_dash() {
        assert_eq!(
            step("RUN -- --version"),
            Instruction::Run(Command::Shell("--version".into()))
        );
        assert_eq!(
            step("RUN -x --y"),
            Instruction::Run(Command::Shell("-x --y".into()))
        );
    }

    #[test]
    fn heredocs_are_refused() {
        for line in [
            "RUN <<EOF",
            "RUN cat <<EOF > /etc/x",
            "RUN <<-EOF",
            "RUN python3 <<'PY'",
            "RUN cat <<\"EOF\"",
            "RUN 3<<EOF cat",
            "COPY <<EOF /etc/motd",
            "ADD <<EOF /etc/motd",
        ] {
            assert_step_refused(line, "heredocs");
        }
        assert_refused("FROM a\nRUN cat \\\n  <<EOF\nhello\nEOF\n", 2, "heredocs");
    }

    #[test]
    fn shift_operators_and_here_strings_are_not_heredocs() {
        for line in [
            "RUN echo $((1<<2))",
            "RUN cat <<<word",
            "RUN echo '<<EOF'",
            "RUN echo \"a <<EOF\"",
            "RUN echo a<<b",
            "RUN cat << EOF",
            r#"RUN ["cat", "<<EOF"]"#,
        ] {
            assert!(matches!(step(line), Instruction::Run(_)), "{line}");
        }
    }

    #[test]
    fn cmd_and_entrypoint() {
        assert_eq!(
            step("CMD [\"nginx\", \"-g\", \"daemon off;\"]"),
            Instruction::Cmd(Command::Exec(strings(&["nginx", "-g", "daemon off;"])))
        );
        assert_eq!(step("CMD []"), Instruction::Cmd(Command::Exec(vec![])));
        assert_eq!(
            step("cmd python app.py"),
            Instruction::Cmd(Command::Shell("python app.py".into()))
        );
        assert_eq!(
            step("ENTRYPOINT [\"/entrypoint.sh\"]"),
            Instruction::Entrypoint(Command::Exec(strings(&["/entrypoint.sh"])))
        );
        assert_eq!(
            step("ENTRYPOINT exec top -b"),
            Instruction::Entrypoint(Command::Shell("exec top -b".into()))
        );
        assert_step_refused("CMD --help", "`CMD` takes no flags, but `--help` was given");
        assert_step_refused("ENTRYPOINT [\"\\u0000\"]", "NUL");
    }

    #[test]
    fn shell_instruction() {
        assert_eq!(
            step("SHELL [\"/bin/bash\", \"-o\", \"pipefail\", \"-c\"]"),
            Instruction::Shell(strings(&["/bin/bash", "-o", "pipefail", "-c"]))
        );
        assert_step_refused("SHELL /bin/bash -c", "JSON form");
        assert_step_refused("SHELL [\"/bin/bash\", 1]", "JSON array of strings");
        assert_step_refused("SHELL [\"/bin/bash\"", "JSON form");
        assert_step_refused("SHELL []", "names no shell");
    }

    // --- COPY and ADD -------------------------------------------------------

    fn copy(add: bool, sources: &[&str], dest: &str) -> Copy {
        Copy {
            add,
            sources: sources.iter().map(|s| w(s)).collect(),
            dest: w(dest),
            chown: None,
            chmod: None,
            from: None,
        }
    }

    #[test]
    fn copy_forms() {
        assert_eq!(
            step("COPY . /app"),
            Instruction::Copy(copy(false, &["."], "/app"))
        );
        assert_eq!(
            step("COPY a.txt b/ $SRC/c /dest/"),
            Instruction::Copy(copy(false, &["a.txt", "b/", "$SRC/c"], "/dest/"))
        );
        assert_eq!(
            step("COPY [\"my file.txt\", \"other\", \"/my dest/\"]"),
            Instruction::Copy(copy(false, &["my file.txt", "other"], "/my dest/"))
        );
        assert_eq!(
            step("COPY \"my file.txt\" 'other file' /dest"),
            Instruction::Copy(copy(false, &["\"my file.txt\"", "'other file'"], "/dest"))
        );
        assert_eq!(
            step("COPY my\\ file /dest"),
            Instruction::Copy(copy(false, &["my\\ file"], "/dest"))
        );
        assert_eq!(
            step("ADD app.tar.gz /opt/"),
            Instruction::Copy(copy(true, &["app.tar.gz"], "/opt/"))
        );
    }

    #[test]
    fn an_expansion_past_its_bound_is_an_error_not_a_huge_string() {
        let big = "x".repeat(40 << 10);
        let lookup = |name: &str| (name == "A").then(|| big.clone());
        assert_eq!(
            Word("$A".into()).expand(&lookup).map(|s| s.len()),
            Ok(40 << 10)
        );
        let err = Word("$A$A".into())
            .expand(&lookup)
            .expect_err("twice 40 KiB is over the bound");
        assert!(err.contains("more than"), "{err}");
        let nested = Word("${B:-$A$A$A}".into())
            .expand(&lookup)
            .expect_err("a default is bounded too");
        assert!(nested.contains("more than"), "{nested}");
    }

    #[test]
    fn copy_from_names_a_build_context() {
        assert_eq!(
            step("COPY --from=files a /b"),
            Instruction::Copy(Copy {
                from: Some(w("files")),
                ..copy(false, &["a"], "/b")
            })
        );
    }

    #[test]
    fn copy_chown_and_chmod() {
        assert_eq!(
            step("COPY --chown=app:app --chmod=0755 run.sh /usr/local/bin/"),
            Instruction::Copy(Copy {
                chown: Some(w("app:app")),
                chmod: Some(w("0755")),
                ..copy(false, &["run.sh"], "/usr/local/bin/")
            })
        );
        assert_eq!(
            step("ADD --chown=\"$USER\" x /y"),
            Instruction::Copy(Copy {
                chown: Some(w("\"$USER\"")),
                ..copy(true, &["x"], "/y")
            })
        );
        assert_step_refused("COPY --chown x /y", "`--chown` needs a value");
        assert_step_refused("COPY --chmod= x /y", "`--chmod` needs a value");
        assert_step_refused("COPY --chown=a --chown=b x /y", "more than once");
        assert_step_refused("COPY --chown=\"a x /y", "unterminated double quote");
    }

    #[test]
    fn copy_refusals() {
        assert_step_refused("COPY --link a /b", "`COPY --link` is not supported");
        assert_step_refused("ADD --link a /b", "`ADD --link` is not supported");
        assert_step_refused("COPY --parents a/b /c", "`COPY --parents` is not supported");
        assert_step_refused(
            "COPY --exclude=*.md . /c",
            "`COPY --exclude` is not supported",
        );
        assert_step_refused(
            "ADD --exclude=*.md . /c",
            "`ADD --exclude` is not supported",
        );
        assert_step_refused("COPY --bogus a /b", "`COPY` has no flag `--bogus`");
        assert_step_refused("COPY onlyone", "at least one source and a destination");
        assert_step_refused(
            "COPY [\"onlyone\"]",
            "at least one source and a destination",
        );
        assert_step_refused("COPY []", "missing its arguments");
        assert_step_refused("COPY [\"a\", 2]", "takes only strings");
        assert_step_refused("COPY [\"a\\u0000\", \"/b\"]", "NUL");
        assert_step_refused("COPY ${A x /y", "no matching `}`");
    }

    #[test]
    fn add_refusals() {
        for line in [
            "ADD https://example.com/a.tar.gz /opt/",
            "ADD \"http://example.com/x\" /x",
            "ADD a ftp://host/b /dir/",
            "ADD [\"https://example.com/x\", \"/x\"]",
        ] {
            assert_step_refused(line, "ADD from URLs is not supported");
            assert_step_refused(line, "download in a RUN step");
        }
        assert_step_refused("ADD git@github.com:o/r.git /src", "git repositories");
        assert_step_refused("ADD github.com/o/r /src", "git repositories");
        assert_step_refused(
            "ADD --checksum=sha256:abc https://x/y /y",
            "`ADD --checksum` is not supported",
        );
        assert_step_refused(
            "ADD --keep-git-dir=true https://x/r.git /r",
            "`ADD --keep-git-dir` is not supported",
        );
        assert_step_refused("ADD --from=x a /b", "`ADD` has no flag `--from`");
        // COPY never fetches, so a `://` there is just a path.
        assert!(matches!(step("COPY a://b /c"), Instruction::Copy(_)));
    }

    // --- ENV, LABEL, ARG, WORKDIR, USER --------------------------------------

    fn env(pairs: &[(&str, &str)]) -> Instruction {
        Instruction::Env(pairs.iter().map(|(k, v)| ((*k).to_owned(), w(v))).collect())
    }

    #[test]
    fn env_forms() {
        assert_eq!(step("ENV A=1"), env(&[("A", "1")]));
        assert_eq!(
            step("ENV A=1 B=\"two words\" C='x=y' D=a\\ b E= F=$A"),
            env(&[
                ("A", "1"),
                ("B", "\"two words\""),
                ("C", "'x=y'"),
                ("D", "a\\ b"),
                ("E", ""),
                ("F", "$A"),
            ])
        );
        // The legacy form: everything after the name is the value.
        assert_eq!(
            step("ENV JAVA_OPTS -Xmx1g  -Dfoo=bar \"x y\""),
            env(&[("JAVA_OPTS", "-Xmx1g  -Dfoo=bar \"x y\"")])
        );
        assert_eq!(step("ENV \"QUOTED\"=1"), env(&[("QUOTED", "1")]));
        assert_eq!(step("ENV my.var-name=1"), env(&[("my.var-name", "1")]));
    }

    #[test]
    fn env_values_expand_with_quotes_removed() {
        let Instruction::Env(pairs) = step("ENV B=\"two  words\" C='$HOME' D=a\\ b\\$") else {
            panic!("not ENV");
        };
        let expanded: Vec<_> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.expand(&|_| Some("h".into()))))
            .collect();
        assert_eq!(
            expanded,
            vec![
                ("B", Ok("two  words".to_owned())),
                ("C", Ok("$HOME".to_owned())),
                ("D", Ok("a b$".to_owned())),
            ]
        );
    }

    #[test]
    fn env_refusals() {
        assert_step_refused("ENV", "missing its arguments");
        assert_step_refused("ENV A", "`ENV A` has no value");
        assert_step_refused("ENV A=1 B", "`B` in `ENV` is not of the form `name=value`");
        assert_step_refused("ENV A=${X:-two words}", "not of the form `name=value`");
        assert_step_refused("ENV =1", "empty variable name");
        assert_step_refused("ENV \"\"=1", "empty variable name");
        assert_step_refused("ENV $NAME=1", "cannot contain `$`");
        assert_step_refused("ENV A$B value", "cannot contain `$`");
        assert_step_refused("ENV A=\"unterminated", "unterminated double quote");
        assert_step_refused("ENV A='unterminated value", "unterminated single quote");
        assert_step_refused("ENV A=\"x\\\"", "unterminated double quote");
        assert_step_refused("ENV \"A=1", "unterminated double quote");
        assert_step_refused("ENV A=${B", "no matching `}`");
        assert_step_refused("ENV --flag A=1", "`ENV` takes no flags");
    }

    #[test]
    fn label_forms() {
        assert_eq!(
            step("LABEL org.opencontainers.image.title=\"My app\" \"com.example.x\"=\"a = b\""),
            Instruction::Label(vec![
                (w("org.opencontainers.image.title"), w("\"My app\"")),
                (w("\"com.example.x\""), w("\"a = b\"")),
            ])
        );
        assert_eq!(
            step("LABEL maintainer Jane Doe <jane@example.com>"),
            Instruction::Label(vec![(w("maintainer"), w("Jane Doe <jane@example.com>"))])
        );
        assert_eq!(
            step("LABEL $PREFIX.version=1"),
            Instruction::Label(vec![(w("$PREFIX.version"), w("1"))])
        );
        assert_step_refused("LABEL =x", "empty key");
        assert_step_refused("LABEL ''=x", "empty key");
        assert_step_refused("LABEL a=1 b", "not of the form `name=value`");
        assert_step_refused("LABEL onlykey", "`LABEL onlykey` has no value");
    }

    #[test]
    fn arg_forms() {
        assert_eq!(
            step("ARG VERSION"),
            Instruction::Arg(ArgDecl {
                name: "VERSION".into(),
                default: None,
            })
        );
        assert_eq!(
            step("ARG _v2=\"1.0 beta\""),
            Instruction::Arg(ArgDecl {
                name: "_v2".into(),
                default: Some(w("\"1.0 beta\"")),
            })
        );
        assert_eq!(
            step("ARG EMPTY="),
            Instruction::Arg(ArgDecl {
                name: "EMPTY".into(),
                default: Some(w("")),
            })
        );
        assert_step_refused("ARG 1ABC", "not a valid ARG name");
        assert_step_refused("ARG my-arg=1", "not a valid ARG name");
        assert_step_refused("ARG =1", "not a valid ARG name");
        assert_step_refused("ARG \"A\"=1", "not a valid ARG name");
        assert_step_refused("ARG A=1 B=2", "one variable per line");
        assert_step_refused("ARG A=\"x", "unterminated double quote");
        assert_refused("ARG bad-name\nFROM x", 1, "not a valid ARG name");
    }

    #[test]
    fn workdir_and_user() {
        assert_eq!(step("WORKDIR /app"), Instruction::Workdir(w("/app")));
        assert_eq!(
            step("WORKDIR /my dir/$SUB"),
            Instruction::Workdir(w("/my dir/$SUB"))
        );
        assert_eq!(step("USER app:staff"), Instruction::User(w("app:staff")));
        assert_eq!(step("user 1000"), Instruction::User(w("1000")));
        assert_step_refused(
            "WORKDIR",
            "`WORKDIR` is missing its arguments; write it as `WORKDIR /path`",
        );
        assert_step_refused("USER ${NAME", "no matching `}`");
        assert_step_refused("WORKDIR --x /a", "`WORKDIR` takes no flags");
    }

    #[test]
    fn instructions_without_effect_are_warnings() {
        let dockerfile = parsed(
            "FROM a\nEXPOSE 80/tcp\nVOLUME [\"/data\"]\nSTOPSIGNAL SIGTERM\n\
             HEALTHCHECK --interval=5s CMD curl -f http://localhost/\nMAINTAINER me\n\
             RUN true\n",
        );
        assert_eq!(
            dockerfile.warnings,
            vec![
                "line 2: `EXPOSE` has no effect in moat templates",
                "line 3: `VOLUME` has no effect in moat templates",
                "line 4: `STOPSIGNAL` has no effect in moat templates",
                "line 5: `HEALTHCHECK` has no effect in moat templates",
                "line 6: `MAINTAINER` has no effect in moat templates",
            ]
        );
        assert_eq!(dockerfile.steps.len(), 1);
        assert_eq!(dockerfile.steps.first().map(|s| s.line), Some(7));
    }

    // --- lexing -------------------------------------------------------------

    #[test]
    fn continuations_join_lines_and_skip_comments_and_blanks() {
        let src = "FROM a\n\
                   RUN apt-get update \\\n\
                   # a comment inside the instruction\n\
                   \n\
                   \x20   \t\n\
                   \x20 && apt-get install -y \\  \t\n\
                   \x20      curl\n\
                   ENV A=1\n";
        let dockerfile = parsed(src);
        assert_eq!(
            dockerfile.steps,
            vec![
                Step {
                    line: 2,
                    text: "RUN apt-get update   && apt-get install -y        curl".into(),
                    instruction: Instruction::Run(Command::Shell(
                        "apt-get update   && apt-get install -y        curl".into()
                    )),
                },
                Step {
                    line: 8,
                    text: "ENV A=1".into(),
                    instruction: env(&[("A", "1")]),
                },
            ]
        );
    }

    #[test]
    fn continuation_inside_keyword_and_arguments() {
        let dockerfile = parsed("FR\\\nOM a\nCOPY a \\\n b \\\n /c/\n");
        assert_eq!(dockerfile.from.image, w("a"));
        assert_eq!(
            dockerfile.steps.first().map(|s| &s.instruction),
            Some(&Instruction::Copy(copy(false, &["a", "b"], "/c/")))
        );
    }

    #[test]
    fn comments_never_continue() {
        let dockerfile = parsed("# comment \\\nFROM a\nRUN a \\\n# comment \\\n b\n");
        assert_eq!(dockerfile.from.line, 2);
        assert_eq!(
            dockerfile.steps.first().map(|s| s.text.as_str()),
            Some("RUN a  b")
        );
    }

    #[test]
    fn continuation_at_end_of_file() {
        assert_eq!(
            parsed("FROM a\nRUN echo hi \\")
                .steps
                .first()
                .map(|s| &s.instruction),
            Some(&Instruction::Run(Command::Shell("echo hi".into())))
        );
        assert_eq!(
            parsed("FROM a\nRUN echo hi \\\n\n# trailing comment\n")
                .steps
                .first()
                .map(|s| &s.text),
            Some(&"RUN echo hi".to_owned())
        );
        // A lone escape character is an empty instruction, not an error.
        assert!(parsed("FROM a\n\\").steps.is_empty());
        assert!(parsed("FROM a\n\\\n\\\n").steps.is_empty());
    }

    #[test]
    fn comments_and_indentation() {
        let dockerfile = parsed("  # leading comment\n\t FROM a\n   # x\n");
        assert_eq!(dockerfile.from.line, 2);
        assert_refused("FROM a # not a comment", 1, "optional `AS name`");
        // `#` in the middle of a line is part of it.
        assert_eq!(
            step("RUN echo a # b"),
            Instruction::Run(Command::Shell("echo a # b".into()))
        );
    }

    #[test]
    fn crlf_and_bom() {
        let dockerfile = parsed("\u{feff}FROM a\r\nRUN echo \\\r\n  hi\r\nENV A=1\r\n");
        assert_eq!(dockerfile.from.image, w("a"));
        assert_eq!(
            dockerfile
                .steps
                .iter()
                .map(|s| s.text.as_str())
                .collect::<Vec<_>>(),
            vec!["RUN echo   hi", "ENV A=1"]
        );
        let dockerfile = parsed("\u{feff}# escape=`\r\nFROM a\r\nRUN echo `\r\n hi\r\n");
        assert_eq!(
            dockerfile.steps.first().map(|s| s.text.as_str()),
            Some("RUN echo  hi")
        );
    }

    #[test]
    fn escape_directive_backtick() {
        let src = "# escape=`\n\
                   FROM mcr.microsoft.com/windows\n\
                   RUN dir C:\\ `\n\
                   \x20   && echo done\n\
                   WORKDIR C:\\Users\\app\n\
                   ENV A=`$HOME B=\"x`\"y\" C=a`` D=${X:-`}}\n\
                   COPY my` file.txt C:\\dest\\\n";
        let dockerfile = parsed(src);
        let steps: Vec<_> = dockerfile
            .steps
            .into_iter()
            .map(|s| s.instruction)
            .collect();
        assert_eq!(
            steps.first(),
            Some(&Instruction::Run(Command::Shell(
                "dir C:\\     && echo done".into()
            )))
        );
        // Words are stored with `\` escapes, so they expand with the same meaning.
        assert_eq!(
            steps.get(1),
            Some(&Instruction::Workdir(w("C:\\\\Users\\\\app")))
        );
        let Some(Instruction::Env(pairs)) = steps.get(2) else {
            panic!("not ENV: {steps:?}");
        };
        let expanded: Vec<_> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.expand(&|_| None)))
            .collect();
        assert_eq!(
            expanded,
            vec![
                ("A", Ok("$HOME".to_owned())),
                ("B", Ok("x\"y".to_owned())),
                ("C", Ok("a`".to_owned())),
                ("D", Ok("}".to_owned())),
            ]
        );
        let Some(Instruction::Copy(c)) = steps.get(3) else {
            panic!("not COPY: {steps:?}");
        };
        let sources: Vec<_> = c.sources.iter().map(|s| s.expand(&|_| None)).collect();
        assert_eq!(sources, vec![Ok("my file.txt".to_owned())]);
        assert_eq!(c.dest.expand(&|_| None), Ok("C:\\dest\\".to_owned()));
    }

    #[test]
    fn backtick_words_keep_variables_and_quotes() {
        let src = "# escape=`\nFROM a\nWORKDIR \"${BASE:-C:\\x}\\$USER\" '$LIT'\n";
        let dockerfile = parsed(src);
        let Some(Instruction::Workdir(word)) = dockerfile.steps.first().map(|s| &s.instruction)
        else {
            panic!("not WORKDIR");
        };
        let vars = |name: &str| (name == "USER").then(|| "bob".to_owned());
        assert_eq!(word.expand(&vars), Ok("C:\\x\\bob $LIT".to_owned()));
    }

    /// Swaps `\\` and `` ` ``, turning a word for one escape character into the
    /// same word for the other.
    fn swap_escapes(s: &str) -> String {
        s.chars()
            .map(|c| match c {
                '\\' => '`',
                '`' => '\\',
                c => c,
            })
            .collect()
    }

    #[test]
    fn backtick_escape_mirrors_backslash_escape() {
        const PIECES: [&str; 16] = [
            "\\", "`", " ", "\"", "'", "$", "${", "}", ":-", "+", "A", "x", "{", "\\$", "\\\"",
            "${A:-",
        ];
        let vars = |name: &str| (name == "A").then(|| "v".to_owned());
        let mut state: u64 = 7;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        for _ in 0..2_000 {
            let len = next() % 10;
            let word: String = std::iter::once("x")
                .chain((0..len).filter_map(|_| PIECES.get(next() % PIECES.len()).copied()))
                .collect();
            let expanded = |src: String| {
                parse(&src).map(|d| match d.steps.first().map(|s| &s.instruction) {
                    Some(Instruction::Workdir(w)) => w.expand(&vars),
                    other => Err(format!("{other:?}")),
                })
            };
            let plain = expanded(format!("FROM a\nWORKDIR {word}\n"));
            let backtick = expanded(format!(
                "# escape=`\nFROM a\nWORKDIR {}\n",
                swap_escapes(&word)
            ));
            match (plain, backtick) {
                (Ok(Ok(a)), Ok(Ok(b))) => assert_eq!(swap_escapes(&a), b, "{word:?}"),
                (Err(_), Err(_)) => {}
                (a, b) => panic!("{word:?}: {a:?} vs {b:?}"),
            }
        }
    }

    #[test]
    fn escape_directive_forms() {
        // Backslash is the default and can be named explicitly, in any spacing.
        for top in ["# escape=\\", "#escape=\\", "  #  ESCAPE =  \\  "] {
            let dockerfile = parsed(&format!("{top}\nFROM a\nRUN a \\\n b\n"));
            assert_eq!(dockerfile.steps.len(), 1, "{top}");
        }
        // The syntax and check directives are ignored, in any order.
        let dockerfile = parsed(
            "# syntax=docker/dockerfile:1\n# check=skip=all\n# escape=`\nFROM a\nRUN a `\n b\n",
        );
        assert_eq!(dockerfile.steps.len(), 1);
        assert_refused("# escape=x\nFROM a", 1, "only a backslash or a backtick");
        assert_refused("# escape=`\n# escape=`\nFROM a", 2, "more than once");
        assert_refused("# syntax=a\n# syntax=b\nFROM a", 2, "more than once");
    }

    #[test]
    fn directives_stop_at_the_first_other_line() {
        // After a blank line, a comment, an unknown directive or an instruction,
        // `# escape=` is a plain comment, so `\` still continues lines.
        for top in [
            "\n# escape=`",
            "# a comment\n# escape=`",
            "# unknown=value\n# escape=`",
            "ARG A\n# escape=`",
            "# escape=\n# escape=`",
        ] {
            let dockerfile = parsed(&format!("{top}\nFROM a\nRUN a \\\n b\n"));
            assert_eq!(
                dockerfile.steps.first().map(|s| s.text.as_str()),
                Some("RUN a  b"),
                "{top}"
            );
        }
        // A duplicate after the directives ended is a comment, not an error.
        assert_eq!(parsed("FROM a\n# escape=x\n").steps.len(), 0);
    }

    #[test]
    fn size_and_nul_limits() {
        let big = format!("FROM a\n#{}\n", "x".repeat(MAX_DOCKERFILE_BYTES));
        let e = refused(&big);
        assert_eq!(e.line, 0);
        assert!(e.message.contains("over the limit"), "{e}");
        let padded = format!("FROM a\n#{}", "x".repeat(MAX_DOCKERFILE_BYTES - 8));
        assert_eq!(padded.len(), MAX_DOCKERFILE_BYTES);
        assert_eq!(parsed(&padded).from.image, w("a"));
        assert_refused("FROM a\nRUN echo\n# \0\n", 3, "NUL byte");
        assert_refused("\0", 1, "NUL byte");
    }

    #[test]
    fn instruction_limit() {
        let within = format!("FROM a\n{}", "RUN true\n".repeat(MAX_INSTRUCTIONS - 1));
        assert_eq!(parsed(&within).steps.len(), MAX_INSTRUCTIONS - 1);
        let over = format!("# c\nFROM a\n{}", "RUN true\n".repeat(MAX_INSTRUCTIONS));
        assert_refused(&over, MAX_INSTRUCTIONS + 2, "more than 256 instructions");
        // Comments, blank lines and continuations do not count.
        let lines = format!(
            "FROM a\n{}",
            "# c\n\nRUN a \\\n b\n".repeat(MAX_INSTRUCTIONS - 1)
        );
        assert_eq!(parsed(&lines).steps.len(), MAX_INSTRUCTIONS - 1);
    }

    #[test]
    fn error_display() {
        let e = DockerfileError::new(7, "something is wrong");
        assert_eq!(e.to_string(), "line 7: something is wrong");
        assert_eq!(
            DockerfileError::new(0, "whole file").to_string(),
            "whole file"
        );
        let boxed: Box<dyn std::error::Error> = Box::new(e);
        assert!(boxed.to_string().starts_with("line 7"));
    }

    #[test]
    fn long_text_is_shortened_in_messages() {
        let name = "X".repeat(10_000);
        let e = refused(&format!("{name}\nFROM a"));
        assert!(e.message.len() < 400, "{}", e.message.len());
        assert!(e.message.contains('…'));
    }

    // --- Word::expand -------------------------------------------------------

    #[test]
    fn expand_plain_and_simple_references() {
        let vars = [("A", "1"), ("B", "two words"), ("EMPTY", ""), ("_x9", "y")];
        expands_to("plain/text:1", &vars, "plain/text:1");
        expands_to("$A", &vars, "1");
        expands_to("${A}", &vars, "1");
        expands_to("pre-$A-post", &vars, "pre-1-post");
        expands_to("$A$B", &vars, "1two words");
        expands_to("${A}x", &vars, "1x");
        expands_to("$Ax", &vars, "");
        expands_to("$_x9.", &vars, "y.");
        expands_to("$UNSET", &vars, "");
        expands_to("${UNSET}", &vars, "");
        expands_to("$EMPTY", &vars, "");
        expands_to("", &vars, "");
    }

    #[test]
    fn expand_modifiers() {
        let vars = [("SET", "v"), ("EMPTY", "")];
        expands_to("${SET:-d}", &vars, "v");
        expands_to("${EMPTY:-d}", &vars, "d");
        expands_to("${UNSET:-d}", &vars, "d");
        expands_to("${SET-d}", &vars, "v");
        expands_to("${EMPTY-d}", &vars, "");
        expands_to("${UNSET-d}", &vars, "d");
        expands_to("${SET:+a}", &vars, "a");
        expands_to("${EMPTY:+a}", &vars, "");
        expands_to("${UNSET:+a}", &vars, "");
        expands_to("${SET+a}", &vars, "a");
        expands_to("${EMPTY+a}", &vars, "a");
        expands_to("${UNSET+a}", &vars, "");
        expands_to("${UNSET:-}", &vars, "");
        expands_to("${UNSET:-a b  c}", &vars, "a b  c");
        expands_to("${UNSET:-$SET/x}", &vars, "v/x");
    }

    #[test]
    fn expand_nested_defaults() {
        expands_to("${a:-${b:-${c}}}", &[("c", "C")], "C");
        expands_to("${a:-${b:-${c}}}", &[("b", "B"), ("c", "C")], "B");
        expands_to("${a:-${b:-${c}}}", &[("a", "A")], "A");
        expands_to("${a:-${b:-${c:-deep}}}", &[], "deep");
        expands_to("${a:+[${b:-none}]}", &[("a", "1")], "[none]");
        expands_to("${a:-x}${b:-y}", &[], "xy");
    }

    #[test]
    fn expand_quotes_and_escapes() {
        let vars = [("A", "1")];
        expands_to("'$A'", &vars, "$A");
        expands_to("'a \\ b'", &vars, "a \\ b");
        expands_to("\"$A\"", &vars, "1");
        expands_to("\"${A}\"", &vars, "1");
        expands_to("\"a  b\"", &vars, "a  b");
        expands_to("\"it's\"", &vars, "it's");
        expands_to("'say \"hi\"'", &vars, "say \"hi\"");
        expands_to("\\$A", &vars, "$A");
        expands_to("\"\\$A\"", &vars, "$A");
        expands_to("\"\\\"\"", &vars, "\"");
        expands_to("\"\\\\\"", &vars, "\\");
        expands_to("\"\\x\"", &vars, "\\x");
        expands_to("\\x\\\\y", &vars, "x\\y");
        expands_to("a\\ b", &vars, "a b");
        expands_to("trailing\\", &vars, "trailing");
        expands_to("a\"b\"c'd'e", &vars, "abcde");
        expands_to("${U:-\"x y\"}", &vars, "x y");
        expands_to("${U:-\"}\"}", &vars, "}");
        expands_to("${U:-\\}}", &vars, "}");
        expands_to("${U:-'$A'}", &vars, "$A");
        expands_to("\"${U:-\"$A\"}\"", &vars, "1");
        expands_to("}", &vars, "}");
    }

    #[test]
    fn expand_literal_dollars() {
        expands_to("$", &[], "$");
        expands_to("a$", &[], "a$");
        expands_to("$-x", &[], "$-x");
        expands_to("$$", &[], "$$");
        expands_to("$ x", &[], "$ x");
        expands_to("\"$\"", &[], "$");
        expands_to("100$/h", &[], "100$/h");
        // Positional parameters are never set in a build.
        expands_to("$1", &[], "");
        expands_to("${12}", &[], "");
    }

    #[test]
    fn expansion_is_not_repeated() {
        let vars = [("A", "$B"), ("B", "no"), ("Q", "\"q\"")];
        expands_to("$A", &vars, "$B");
        expands_to("${U:-$A}", &vars, "$B");
        expands_to("$Q", &vars, "\"q\"");
    }

    #[test]
    fn expand_errors() {
        for (word, needle) in [
            ("${", "no matching `}`"),
            ("${A", "no matching `}`"),
            ("${A:-x", "no matching `}`"),
            ("${A:-${B}", "no matching `}`"),
            ("${A:", "no matching `}`"),
            ("${A:-x\\", "no matching `}`"),
            ("${}", "bad substitution"),
            ("${:-x}", "bad substitution"),
            ("${{A}}", "bad substitution"),
            ("${-A}", "bad substitution"),
            ("${A B}", "bad substitution"),
            ("${A.b}", "bad substitution"),
            ("${1a}", "bad substitution"),
            ("${A?err}", "`${A?...}` is not supported"),
            ("${A:?err}", "`${A:?...}` is not supported"),
            ("${A#pre}", "is not supported"),
            ("${A%suf}", "is not supported"),
            ("${A/x/y}", "is not supported"),
            ("${A:=x}", "is not supported"),
            ("'abc", "unterminated single quote"),
            ("\"abc", "unterminated double quote"),
            ("\"abc\\\"", "unterminated double quote"),
            ("\"abc\\", "unterminated double quote"),
            ("${A:-'x}", "unterminated single quote"),
        ] {
            let e = expand_error(word);
            assert!(e.contains(needle), "{word:?}: {e}");
        }
    }

    fn nested(depth: usize) -> String {
        let mut word = "x".to_owned();
        for _ in 0..depth {
            word = format!("${{V:-{word}}}");
        }
        word
    }

    #[test]
    fn nesting_is_limited() {
        expands_to(&nested(MAX_NESTING), &[], "x");
        let e = expand_error(&nested(MAX_NESTING + 1));
        assert!(e.contains("nested more than 32 deep"), "{e}");
        // Far deeper input fails the same way, without exhausting the stack.
        let deep = "${V:-".repeat(200_000);
        assert!(expand_error(&deep).contains("nested more than 32 deep"));
        let deep_quoted = "\"${V:-".repeat(200_000);
        assert!(expand_error(&deep_quoted).contains("nested more than 32 deep"));
        assert_step_refused(&format!("ENV A={}", nested(MAX_NESTING + 1)), "nested more");
    }

    #[test]
    fn expand_handles_unicode() {
        expands_to("héllo ${NAME:-wörld} ✓", &[], "héllo wörld ✓");
        expands_to("'ü'\"ß\"\\é", &[], "üßé");
        expands_to("$Ä", &[], "$Ä");
    }

    // --- odd inputs ---------------------------------------------------------

    #[test]
    fn odd_inputs_do_not_panic() {
        for src in [
            "",
            " ",
            "\n",
            "\r\n",
            "\r",
            "\\",
            "\\\n",
            "`",
            "#",
            "# escape=`",
            "# escape=`\n`",
            "\u{feff}",
            "\u{feff}\u{feff}FROM a",
            "FROM",
            "FROM \\",
            "FROM a\n\\\n",
            "FROM a\nRUN [",
            "FROM a\nRUN ]",
            "FROM a\nRUN [\"",
            "FROM a\nENV \"",
            "FROM a\nENV '",
            "FROM a\nENV =",
            "FROM a\nENV ==",
            "FROM a\nLABEL \"=\"",
            "FROM a\nCOPY --",
            "FROM a\nCOPY --=",
            "FROM a\nCOPY --chown=",
            "FROM a\nCOPY \"a b",
            "FROM a\nADD \\",
            "FROM a\nRUN <<",
            "FROM a\nRUN <<-",
            "FROM a\nRUN 1<<",
            "FROM a\nARG =",
            "FROM a\nARG",
            "FROM a\nSHELL [[]]",
            "FROM a\nUSER ${",
            "FROM a\nUSER $",
            "FROM a\nUSER ${a:-${b:-",
            "FROM ${a:-'}",
            "FROM 'a\\",
            "FROM a\nWORKDIR \u{a0}",
            "FROM a\nRUN \u{2028}",
            "\u{0b}FROM\u{0c}a",
            "FROM a\nENV A=\"\\",
            "FROM a\nENV A \\",
            "FROM a\nONBUILD",
            "FROM a\nFROM",
            "FROM a\nEXPOSE",
            "FROM a\n    \\  \n",
        ] {
            let _ = parse(src);
        }
    }

    #[test]
    fn pseudo_random_inputs_do_not_panic() {
        const PIECES: [&str; 30] = [
            "FROM a\n", "RUN ", "COPY ", "ADD ", "ENV ", "ARG ", "LABEL ", "SHELL ", "CMD ", "\\",
            "`", "\n", "\r\n", " ", "\t", "#", "\"", "'", "$", "${", "}", ":-", "+", "=", "[", "]",
            "--", "<<", "é", "x",
        ];
        // A fixed linear congruential generator keeps the test repeatable.
        let mut state: u64 = 0x5eed;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        for _ in 0..3_000 {
            let len = next() % 40;
            let text: String = (0..len)
                .filter_map(|_| PIECES.get(next() % PIECES.len()).copied())
                .collect();
            if let Ok(dockerfile) = parse(&text) {
                for step in &dockerfile.steps {
                    assert!(text.contains(step.text.split_whitespace().next().unwrap_or("")));
                }
            }
            let _ = Word(text.clone()).expand(&|name| Some(name.to_owned()));
            let _ = Word(text).expand(&|_| None);
        }
    }
}
