//! Many rows read as one: the database aggregates a query's rows into one JSON array of
//! arrays, read back with serde.
//!
//! Why: sqlx hands every row from SQLite's worker thread to the runtime (a wake-up across
//! threads when the bounded row channel fills or drains) and converts it to the `Any`
//! driver's form column by column, allocating each column's name and value. For a restore's
//! pages of thousands of entries that cost about five times the query itself (on 100,000
//! entries, 1 s of CPU against 0.17 s for SQLite to run the query and build the JSON). Queries
//! that read many rows of a few columns in one go use this; the rest stay plain.

use serde::de::DeserializeOwned;

use super::{Dialect, db};
use crate::error::Error;

/// The statement that returns the rows of `inner` as one JSON text, ordered by `order`.
/// `inner` is a SELECT whose `columns` result columns are named `c0`, `c1`, ...; `order`
/// names them as `s.c0`, ... (empty: in no particular order, for a reader that orders
/// the rows itself and would pay for the database's sort). Bytes must be given as hex text
/// (see [`hex`]): JSON has no bytes.
pub(crate) fn statement(dialect: Dialect, inner: &str, columns: usize, order: &str) -> String {
    let list = (0..columns)
        .map(|i| format!("s.c{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let (agg, array) = match dialect {
        Dialect::Sqlite => ("json_group_array", "json_array"),
        Dialect::Postgres => ("json_agg", "json_build_array"),
    };
    let order = if order.is_empty() {
        String::new()
    } else {
        format!(" ORDER BY {order}")
    };
    format!("SELECT CAST({agg}({array}({list}){order}) AS TEXT) FROM ({inner}) s")
}

/// `expr` (bytes) as hex text, in the statement's dialect; NULL stays NULL (SQLite's `hex`
/// alone makes it "").
pub(crate) fn hex(dialect: Dialect, expr: &str) -> String {
    match dialect {
        Dialect::Sqlite => format!("nullif(hex({expr}), '')"),
        Dialect::Postgres => format!("encode({expr}, 'hex')"),
    }
}

/// Runs a [`statement`] (its arguments bound) on `on` (the pool, or a transaction's
/// connection) and reads its rows as `R` (a tuple in column order). `what` names the query
/// in errors.
pub(crate) async fn fetch<'q, 'c, R, E>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    on: E,
    what: &'static str,
) -> Result<Vec<R>, Error>
where
    R: DeserializeOwned,
    E: sqlx::Executor<'c, Database = sqlx::Any>,
    'q: 'c,
{
    let row = query.fetch_one(on).await.map_err(db(what))?;
    from_row(&row, what)
}

fn from_row<R: DeserializeOwned>(row: &sqlx::any::AnyRow, what: &str) -> Result<Vec<R>, Error> {
    use sqlx::Row;
    // PostgreSQL aggregates no rows to NULL, SQLite to "[]".
    let Some(text) = row.try_get::<Option<String>, _>(0).map_err(db(what))? else {
        return Ok(Vec::new());
    };
    parse(&text, what)
}

fn parse<R: DeserializeOwned>(text: &str, what: &str) -> Result<Vec<R>, Error> {
    serde_json::from_str(text)
        .map_err(|e| Error::Invalid(format!("catalog: {what}: unreadable rows: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_aggregate_in_each_dialect() {
        let inner = "SELECT e.path AS c0, e.size AS c1 FROM entries e";
        assert_eq!(
            statement(Dialect::Sqlite, inner, 2, "s.c0"),
            "SELECT CAST(json_group_array(json_array(s.c0, s.c1) ORDER BY s.c0) AS TEXT) \
             FROM (SELECT e.path AS c0, e.size AS c1 FROM entries e) s"
        );
        assert_eq!(
            statement(Dialect::Postgres, inner, 2, "s.c0"),
            "SELECT CAST(json_agg(json_build_array(s.c0, s.c1) ORDER BY s.c0) AS TEXT) \
             FROM (SELECT e.path AS c0, e.size AS c1 FROM entries e) s"
        );
        assert_eq!(
            statement(Dialect::Sqlite, inner, 2, ""),
            "SELECT CAST(json_group_array(json_array(s.c0, s.c1)) AS TEXT) \
             FROM (SELECT e.path AS c0, e.size AS c1 FROM entries e) s"
        );
        assert_eq!(hex(Dialect::Postgres, "c.id"), "encode(c.id, 'hex')");
        assert_eq!(hex(Dialect::Sqlite, "c.id"), "nullif(hex(c.id), '')");
    }

    #[test]
    fn rows_keep_nulls_large_integers_and_escapes() {
        let rows: Vec<(String, Option<i64>, i64)> = parse(
            r#"[["a\"b\\c\u00e9", null, 1795990890581640000], ["d", 7, -1]]"#,
            "test",
        )
        .unwrap();
        assert_eq!(
            rows,
            vec![
                ("a\"b\\cé".to_string(), None, 1_795_990_890_581_640_000),
                ("d".to_string(), Some(7), -1)
            ]
        );
        let err = parse::<(String,)>("[[1]]", "listing things").unwrap_err();
        assert!(err.to_string().contains("listing things"), "{err}");
    }
}
