//! Renders a model's own Jinja chat template the way Hugging Face transformers does
//! (`tokenizer.apply_chat_template(..., tokenize=False)`), with minijinja.
//!
//! What transformers sets up, and what this module reproduces:
//! - Jinja options `trim_blocks=True`, `lstrip_blocks=True`, and Jinja's default of dropping a
//!   single trailing newline at the end of the template; the `loopcontrols` extension
//!   (`{% break %}`, `{% continue %}`); lenient undefined values (Jinja's default `Undefined`).
//! - Globals `raise_exception(message)` (the render fails with that message) and
//!   `strftime_now(format)` (the current date; here in UTC, transformers uses local time).
//! - A `tojson` filter that is Python's `json.dumps(x, ensure_ascii=False, indent=indent,
//!   separators=separators, sort_keys=sort_keys)`: `", "`/`": "` separators, keys in insertion
//!   order, non-ASCII text unescaped, Python's float spelling.
//! - Context: `messages`, `add_generation_prompt`, `bos_token`/`eos_token` (left undefined when
//!   the model has none, as transformers does), `tools` and `documents` set to `none`, plus any
//!   extra keyword arguments (`enable_thinking`, `date_string`, `tools`, ...).
//! - transformers' `{% generation %}` block tag (renders its body).
//! - Python string/dict methods that templates call (`strip`, `split`, `startswith`, `items`,
//!   `get`, ...) through minijinja-contrib's `pycompat`; `True`/`False`/`None` printed the
//!   Python way.
//!
//! Compiled templates are cached per template text, so rendering the same template for every
//! prompt of a run parses it once.

use anyhow::Result;
use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

/// The name compiled templates carry; minijinja's error messages mention it with a line number.
const TEMPLATE_NAME: &str = "chat_template";

/// How many distinct templates stay compiled; a run normally uses one.
const MAX_CACHED_TEMPLATES: usize = 16;

/// Renders `template` for `messages` (a JSON list of `{"role", "content", ...}`) with
/// `add_generation_prompt`, `bos_token` and `eos_token`, like transformers'
/// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
pub fn render_chat_template(
    template: &str,
    messages: &serde_json::Value,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    render_chat_template_with(
        template,
        messages,
        add_generation_prompt,
        bos_token,
        eos_token,
        &serde_json::Map::new(),
    )
}

/// [`render_chat_template`] with extra template variables, the `**kwargs` of transformers'
/// `apply_chat_template` (e.g. `tools`, `documents`, `enable_thinking`, `date_string`). They
/// override the standard variables of the same name.
pub fn render_chat_template_with(
    template: &str,
    messages: &serde_json::Value,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
    extra_variables: &serde_json::Map<String, serde_json::Value>,
) -> Result<String> {
    let env = compiled_environment(template)?;
    let mut context: BTreeMap<String, Value> = BTreeMap::new();
    context.insert("messages".into(), Value::from(Serde(messages)));
    context.insert(
        "add_generation_prompt".into(),
        Value::from(add_generation_prompt),
    );
    context.insert("tools".into(), Value::from(()));
    context.insert("documents".into(), Value::from(()));
    // transformers passes only the special tokens the tokenizer has: a missing one is undefined.
    if let Some(bos) = bos_token {
        context.insert("bos_token".into(), Value::from(bos));
    }
    if let Some(eos) = eos_token {
        context.insert("eos_token".into(), Value::from(eos));
    }
    for (name, value) in extra_variables {
        context.insert(name.clone(), Value::from(Serde(value)));
    }
    let compiled = env
        .get_template(TEMPLATE_NAME)
        .map_err(|e| describe_template_error(&e))?;
    compiled
        .render(Value::from(context))
        .map_err(|e| describe_template_error(&e))
}

/// Compiles `template` without rendering it: an error describes its syntax problem.
pub fn check_chat_template(template: &str) -> Result<()> {
    compiled_environment(template).map(|_| ())
}

/// The cached environment holding `template` compiled, compiling it on first use.
fn compiled_environment(template: &str) -> Result<Arc<Environment<'static>>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Environment<'static>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    // A poisoned lock only means another thread panicked while holding it; the map is still
    // consistent (entries are inserted whole), so keep using it.
    if let Some(env) = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(template)
    {
        return Ok(env.clone());
    }
    let env = Arc::new(build_environment(template)?);
    let mut cache = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if cache.len() >= MAX_CACHED_TEMPLATES {
        cache.clear();
    }
    cache.insert(template.to_owned(), env.clone());
    Ok(env)
}

/// A minijinja environment configured like transformers' `ImmutableSandboxedEnvironment`,
/// holding `template` compiled under [`TEMPLATE_NAME`].
fn build_environment(template: &str) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
        .map_err(|e| describe_template_error(&e))?;
    env.set_syntax(syntax);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_formatter(python_formatter);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson_filter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(template))
        .map_err(|e| describe_template_error(&e))?;
    Ok(env)
}

/// transformers' `{% generation %}...{% endgeneration %}` tag (its `AssistantTracker`
/// extension, which marks assistant tokens for training masks) renders its body unchanged.
/// minijinja has no such tag, so each one becomes `{% if true %}` / `{% endif %}` with the same
/// whitespace control (`-`, `+`) on both sides; everything else is kept as written.
fn rewrite_generation_tags(template: &str) -> String {
    if !template.contains("generation") {
        return template.to_owned();
    }
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match generation_tag_replacement(tag) {
            Some((replacement, tag_len)) => {
                out.push_str(&replacement);
                rest = &tag[tag_len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Widest `tojson(indent=N)` accepted (templates use 2 or 4).
const MAX_TOJSON_INDENT: usize = 64;

/// When `tag` (text starting with `{%`) opens with a `generation` or `endgeneration` block tag:
/// its replacement and the tag's length.
fn generation_tag_replacement(tag: &str) -> Option<(String, usize)> {
    // The closing `%}` comes after the opening `{%` (in `{%}` the two overlap).
    let tag_len = tag.get(2..)?.find("%}")? + 4;
    let inner = &tag[2..tag_len - 2];
    let left_control = if inner.starts_with(['-', '+']) {
        &inner[..1]
    } else {
        ""
    };
    let inner = &inner[left_control.len()..];
    let right_control = if inner.ends_with(['-', '+']) {
        &inner[inner.len() - 1..]
    } else {
        ""
    };
    let inner = &inner[..inner.len() - right_control.len()];
    let keyword = match inner.trim() {
        "generation" => "if true",
        "endgeneration" => "endif",
        _ => return None,
    };
    Some((
        format!("{{%{left_control} {keyword} {right_control}%}}"),
        tag_len,
    ))
}

/// Prints values the way Jinja2 (Python) does: `True`/`False` and `None`, where minijinja
/// would print `true`/`false` and `none`; everything else as minijinja prints it.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &mut minijinja::State,
    value: &Value,
) -> Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" })?,
        ValueKind::None => out.write_str("None")?,
        _ => minijinja::escape_formatter(out, state, value)?,
    }
    Ok(())
}

/// Turns a minijinja error into a one-line message: its kind and detail, where in the template
/// (`chat_template:LINE`), and its causes.
fn describe_template_error(err: &minijinja::Error) -> anyhow::Error {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let _ = write!(message, ": {cause}");
        source = cause.source();
    }
    anyhow::anyhow!(message)
}

/// `raise_exception(message)`: transformers' way for a template to reject its input.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("the template raised an exception: {message}"),
    ))
}

/// `strftime_now(format)`: the current date and time formatted like Python's `strftime`, in UTC.
fn strftime_now(format: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(format, now)
}

/// Formats `unix_seconds` (UTC) like Python's `time.strftime`: `%Y %y %m %d %e %j %H %I %M %S
/// %p %a %A %b %B %h %Z %z %F %T %D %%`, glibc's `%-d` style (no padding) for the numeric ones;
/// unknown directives are kept as written.
pub fn strftime_utc(format: &str, unix_seconds: i64) -> String {
    const WEEKDAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let second_of_day = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
    );
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.next_if_eq(&'-').is_some();
        let Some(directive) = chars.next() else {
            out.push('%');
            if unpadded {
                out.push('-');
            }
            break;
        };
        let number = |value: i64, width: usize| {
            if unpadded {
                value.to_string()
            } else {
                format!("{value:0width$}")
            }
        };
        let text = match directive {
            'Y' => year.to_string(),
            'y' => number(year.rem_euclid(100), 2),
            'm' => number(month, 2),
            'd' => number(day, 2),
            'e' => format!("{day:2}"),
            'j' => number(day_of_year, 3),
            'H' => number(hour, 2),
            'I' => number(hour12, 2),
            'M' => number(minute, 2),
            'S' => number(second, 2),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'a' => weekday_name[..3].to_string(),
            'A' => weekday_name.to_string(),
            'b' | 'h' => month_name[..3].to_string(),
            'B' => month_name.to_string(),
            'Z' => "UTC".to_string(),
            'z' => "+0000".to_string(),
            'F' => format!("{year}-{month:02}-{day:02}"),
            'T' => format!("{hour:02}:{minute:02}:{second:02}"),
            'D' => format!("{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            '%' => "%".to_string(),
            other => format!("%{}{other}", if unpadded { "-" } else { "" }),
        };
        out.push_str(&text);
    }
    out
}

/// (year, month 1-12, day 1-31) of the day `days` after 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days from 1970-01-01 to the given date (proleptic Gregorian).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// transformers' `tojson` filter: `json.dumps(value, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, each option also accepted as a keyword.
fn tojson_filter(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let ensure_ascii = kwargs
        .get::<Option<Value>>("ensure_ascii")?
        .is_some_and(|v| v.is_true());
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_str() {
            Some(text) => text.to_owned(),
            None => {
                let width = usize::try_from(v.clone())
                    .ok()
                    .filter(|&w| w <= MAX_TOJSON_INDENT)
                    .ok_or_else(|| {
                        minijinja::Error::new(
                            ErrorKind::InvalidOperation,
                            format!(
                                "tojson: indent must be a string or a number up to {MAX_TOJSON_INDENT}, not {v}"
                            ),
                        )
                    })?;
                " ".repeat(width)
            }
        }),
    };
    let (item_separator, key_separator) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|part| part.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .filter(|parts: &Vec<String>| parts.len() == 2)
                .ok_or_else(|| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings (item, key)",
                    )
                })?;
            (parts[0].clone(), parts[1].clone())
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let sort_keys = kwargs
        .get::<Option<Value>>("sort_keys")?
        .is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let mut writer = PythonJsonWriter {
        out: String::new(),
        ensure_ascii,
        indent,
        item_separator,
        key_separator,
        sort_keys,
    };
    writer.write_value(value, 0)?;
    Ok(Value::from(writer.out))
}

/// Writes values the way Python's `json.dumps` does.
struct PythonJsonWriter {
    out: String,
    ensure_ascii: bool,
    /// `None`: everything on one line; `Some(unit)`: one item per line, `unit` per level.
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

impl PythonJsonWriter {
    fn write_value(&mut self, value: &Value, depth: usize) -> Result<(), minijinja::Error> {
        match value.kind() {
            // Jinja's Undefined is not serialisable in Python; `null` is the lenient reading.
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => {
                let _ = write!(self.out, "{value}");
            }
            ValueKind::Number => {
                let float = f64::try_from(value.clone())?;
                self.out.push_str(&python_float_repr(float));
            }
            ValueKind::String => self.write_string(value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items = value.try_iter()?.checked().collect::<Result<Vec<_>, _>>()?;
                self.write_container('[', ']', items.len(), depth, |writer, index| {
                    writer.write_value(&items[index], depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in value.try_iter()?.checked() {
                    let key = key?;
                    let item = value.get_item(&key)?;
                    entries.push((python_json_key(&key)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container('{', '}', entries.len(), depth, |writer, index| {
                    let (key, item) = &entries[index];
                    writer.write_string(key);
                    let separator = writer.key_separator.clone();
                    writer.out.push_str(&separator);
                    writer.write_value(item, depth + 1)
                })?;
            }
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {other} value is not JSON serializable"),
                ));
            }
        }
        Ok(())
    }

    /// Writes `open`, `len` items (each through `write_item`) separated Python's way, `close`.
    fn write_container(
        &mut self,
        open: char,
        close: char,
        len: usize,
        depth: usize,
        mut write_item: impl FnMut(&mut Self, usize) -> Result<(), minijinja::Error>,
    ) -> Result<(), minijinja::Error> {
        self.out.push(open);
        if len == 0 {
            self.out.push(close);
            return Ok(());
        }
        for index in 0..len {
            if index > 0 {
                let separator = self.item_separator.clone();
                self.out.push_str(&separator);
            }
            self.write_newline_and_indent(depth + 1);
            write_item(self, index)?;
        }
        self.write_newline_and_indent(depth);
        self.out.push(close);
        Ok(())
    }

    fn write_newline_and_indent(&mut self, depth: usize) {
        if let Some(unit) = &self.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(unit);
            }
        }
    }

    /// A JSON string literal with Python's escapes (`\n`, `\"`, `\u001b`, ...; with
    /// `ensure_ascii`, non-ASCII as `\uXXXX` UTF-16 units).
    fn write_string(&mut self, text: &str) {
        self.out.push('"');
        for c in text.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(self.out, "\\u{unit:04x}");
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// A mapping key as Python's `json.dumps` writes it: strings as they are, numbers, booleans and
/// `None` spelled as JSON.
fn python_json_key(key: &Value) -> Result<String, minijinja::Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None | ValueKind::Undefined => "null".to_owned(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
        ValueKind::Number if key.is_integer() => key.to_string(),
        ValueKind::Number => python_float_repr(f64::try_from(key.clone())?),
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {other}"),
            ));
        }
    })
}

/// Python's `repr(float)` as `json.dumps` writes it: shortest round-trip digits, `1.0` for
/// integral values, exponent form (`1e+16`, `1.5e-07`) outside `1e-4 <= |x| < 1e16`.
fn python_float_repr(value: f64) -> String {
    if value.is_nan() {
        return "NaN".to_owned();
    }
    if value.is_infinite() {
        return if value > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0.0"
        } else {
            "0.0"
        }
        .to_owned();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e3", "5e-7".
    let scientific = format!("{value:e}");
    let (mantissa, exponent) = scientific
        .split_once('e')
        .unwrap_or((scientific.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if !(-4..16).contains(&exponent) {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        return format!(
            "{sign}{first}{fraction}e{exponent_sign}{:02}",
            exponent.abs()
        );
    }
    let point = exponent + 1; // digits before the decimal point
    if point <= 0 {
        format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
    } else if point as usize >= digits.len() {
        format!(
            "{sign}{digits}{}.0",
            "0".repeat(point as usize - digits.len())
        )
    } else {
        let (whole, fraction) = digits.split_at(point as usize);
        format!("{sign}{whole}.{fraction}")
    }
}
