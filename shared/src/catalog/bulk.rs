//! Statements over many rows at once.
//!
//! Each statement is a round trip to the database: on SQLite a hand-off to sqlx's connection
//! thread and back (two thread wake-ups), on PostgreSQL a network round trip. A backup of
//! small files wrote four or five rows per file one statement at a time, and those hand-offs
//! were most of its CPU time. Rows are therefore written [`ROWS`] to a statement
//! (`VALUES (…), (…)`), and looked up the same way (`IN (…)`).

use sqlx::any::{Any, AnyArguments};
use sqlx::query::Query;

use super::{Conn, Dialect};

/// Rows per statement: enough to make the round trip negligible, few enough to stay far
/// below either database's limit on bound values (SQLite 32,766, PostgreSQL 65,535) for the
/// widest row (an entry, 14 values).
pub(crate) const ROWS: usize = 128;

/// `head VALUES (…), (…) tail` for `rows` rows of `width` values.
///
/// The marks are bare `?` on SQLite: sqlx asks SQLite the name of every numbered mark of a
/// statement it binds, and SQLite finds a name by walking the statement's list of names, so a
/// statement of n numbered marks costs n² steps; 1,792 of them (128 entries) took more CPU than
/// the rest of a small-file backup. A statement of bare marks has no names to walk. (Never mix
/// the two kinds in one statement: sqlx counts bare marks from the first value on.)
/// PostgreSQL takes `$1, $2, …` only.
pub(crate) fn values(
    dialect: Dialect,
    head: &str,
    width: usize,
    rows: usize,
    tail: &str,
) -> String {
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * width * 6);
    sql.push_str(head);
    sql.push_str(" VALUES ");
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..width {
            if c > 0 {
                sql.push_str(", ");
            }
            match dialect {
                Dialect::Sqlite => sql.push('?'),
                Dialect::Postgres => {
                    sql.push('$');
                    sql.push_str(&(r * width + c + 1).to_string());
                }
            }
        }
        sql.push(')');
    }
    if !tail.is_empty() {
        sql.push(' ');
        sql.push_str(tail);
    }
    sql
}

/// `$first, $first+1, …` for `n` values: the inside of an `IN (…)`.
pub(crate) fn marks(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The query type rows are bound onto (its arguments are owned: any borrow will do).
pub(crate) type AnyQuery = Query<'static, Any, AnyArguments>;

/// Inserts `rows` with `head VALUES (…) tail`, [`ROWS`] to a statement, each row's `width`
/// values bound by `bind` in column order. Returns the rows affected.
pub(crate) async fn insert<T>(
    conn: &mut Conn,
    (head, width, tail): (&str, usize, &str),
    rows: &[T],
    bind: impl Fn(AnyQuery, &T) -> AnyQuery,
) -> Result<u64, sqlx::Error> {
    let dialect = Dialect::of_conn(conn);
    let mut affected = 0;
    for part in rows.chunks(ROWS) {
        let sql = values(dialect, head, width, part.len(), tail);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for row in part {
            q = bind(q, row);
        }
        affected += q.execute(&mut *conn).await?.rows_affected();
    }
    Ok(affected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_numbered_in_order() {
        assert_eq!(
            values(
                Dialect::Postgres,
                "INSERT INTO t (a, b)",
                2,
                3,
                "ON CONFLICT DO NOTHING"
            ),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4), ($5, $6) ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            values(Dialect::Sqlite, "INSERT INTO t (a, b)", 2, 2, "RETURNING a"),
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?) RETURNING a"
        );
        assert_eq!(
            values(Dialect::Postgres, "INSERT INTO t (a)", 1, 1, ""),
            "INSERT INTO t (a) VALUES ($1)"
        );
        assert_eq!(marks(3, 3), "$3, $4, $5");
    }
}
