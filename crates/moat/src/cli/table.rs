//! Output for people: aligned tables, key-value listings, times and sizes.

/// A table with a header row; columns are as wide as their widest cell, two spaces apart.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra ones are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in a newline; no trailing spaces.
    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < row.len() {
                    line.extend(std::iter::repeat_n(' ', w - width(cell)));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `name: value` lines with the values aligned, for one object.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let pad = width - k.chars().count();
        out.push_str(&format!("{k}:{}  {v}", " ".repeat(pad)));
        out.truncate(out.trim_end().len());
        out.push('\n');
    }
    out
}

/// A Unix-milliseconds time as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// An optional time, `-` when absent.
pub fn opt_time(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".into(), time)
}

/// The proleptic Gregorian date of a count of days since 1970-01-01, counting in 400-year
/// eras of 146,097 days whose years start on 1 March (so leap days fall at a year's end).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year from 1 March, 0..365
    let mp = (5 * doy + 2) / 153; // month from March, 0..11
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// CPU thousandths as a count of CPUs: `1`, `0.5`, `0.25`.
pub use moat_proto::units::format_cpus as cpus;

/// A string map as `k=v,k=v` (`-` when empty).
pub fn pairs<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let text = map
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    if text.is_empty() { "-".into() } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&["ID", "STATE", "NOTE"]);
        t.row(vec!["a".into(), "running".into(), "x".into()]);
        t.row(vec!["longer-id".into(), "killed".into()]);
        t.row(vec!["é".into(), "s".into(), "z".into(), "dropped".into()]);
        assert_eq!(
            t.render(),
            "ID         STATE    NOTE\n\
             a          running  x\n\
             longer-id  killed\n\
             é          s        z\n"
        );
        assert_eq!(Table::new(&["A", "BB"]).render(), "A  BB\n");
    }

    #[test]
    fn field_lists_align_values() {
        assert_eq!(
            fields(&[
                ("id", "x".into()),
                ("template", "host".into()),
                ("ended", String::new())
            ]),
            "id:        x\ntemplate:  host\nended:\n"
        );
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(time(1_735_689_599_999), "2024-12-31 23:59:59");
        assert_eq!(time(-1000), "1969-12-31 23:59:59");
        assert_eq!(opt_time(None), "-");
    }

    #[test]
    fn small_formats() {
        assert_eq!(cpus(1000), "1");
        assert_eq!(cpus(500), "0.5");
        assert_eq!(cpus(2250), "2.25");
        assert_eq!(cpus(10), "0.01");
        let map: std::collections::BTreeMap<String, String> = [
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]
        .into();
        assert_eq!(pairs(&map), "a=1,b=2");
        assert_eq!(pairs(&std::collections::BTreeMap::new()), "-");
    }
}
