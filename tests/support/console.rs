//! Reading the admin console's answers: `SHOW` rows by column name, and waiting for a listing
//! to get somewhere.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The rows of a simple query's answer, each as column name -> value (`None` for NULL).
pub fn rows(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Vec<BTreeMap<String, Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), r.get(i).map(str::to_owned)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

pub async fn show(console: &tokio_postgres::Client, what: &str) -> Vec<BTreeMap<String, Option<String>>> {
    rows(&console.simple_query(&format!("SHOW {what}")).await.unwrap())
}

/// The row whose `column` is `value`.
pub fn row_where<'a>(
    rows: &'a [BTreeMap<String, Option<String>>],
    column: &str,
    value: &str,
) -> &'a BTreeMap<String, Option<String>> {
    rows.iter()
        .find(|r| r[column].as_deref() == Some(value))
        .unwrap_or_else(|| panic!("no {column} = {value} in {rows:#?}"))
}

pub fn cell<'a>(row: &'a BTreeMap<String, Option<String>>, column: &str) -> Option<&'a str> {
    row.get(column).unwrap_or_else(|| panic!("no column {column} in {row:?}")).as_deref()
}

/// Polls `SHOW what` until `check` holds, for up to 5 s.
pub async fn until_shown(
    console: &tokio_postgres::Client,
    what: &str,
    check: impl Fn(&[BTreeMap<String, Option<String>>]) -> bool,
) -> Vec<BTreeMap<String, Option<String>>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let shown = show(console, what).await;
        if check(&shown) {
            return shown;
        }
        assert!(Instant::now() < deadline, "SHOW {what} never got there: {shown:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
