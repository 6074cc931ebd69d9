//! The PostgreSQL migrations (`migrations/postgres/`) build the schema the SQLite migrations
//! (`migrations/*.sql`) leave behind: both folders are applied to fresh databases (a SQLite
//! file, a throwaway PostgreSQL cluster) and their catalogs are read back and compared table by
//! table. A new SQLite migration without its PostgreSQL twin fails here, naming what differs.
//!
//! Compared: the set of tables; each table's columns in order with a type family, nullability,
//! default, and whether the column is the generated row id; the primary key; unique
//! constraints; foreign keys with their ON DELETE action; CHECK constraints (column and allowed
//! values); the rows the migrations insert (counts); and the explicitly created indexes by name,
//! with table, columns (or key expressions), uniqueness and partial-index predicate.
//! PostgreSQL-only rules are checked too: integers are BIGINT, and every text column uses the
//! "C" collation (SQLite's byte order).

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{PgPool, SqlitePool};
use storinator_testkit::pg::PgCluster;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    name: String,
    /// integer, text, blob, real; anything else is `other:<type>` and never matches.
    family: String,
    not_null: bool,
    default: Option<String>,
    /// The row id the database assigns (SQLite's INTEGER PRIMARY KEY, PostgreSQL's identity).
    row_id: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ForeignKey {
    columns: Vec<String>,
    table: String,
    references: Vec<String>,
    on_delete: String,
}

#[derive(Debug, Default)]
struct Table {
    columns: Vec<Column>,
    primary_key: Vec<String>,
    uniques: BTreeSet<Vec<String>>,
    foreign_keys: BTreeSet<ForeignKey>,
    /// Each CHECK as `column: 'value', ...` (the column it tests and its literals, sorted).
    checks: BTreeSet<String>,
    rows: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Index {
    table: String,
    columns: Vec<String>,
    unique: bool,
    predicate: Option<String>,
}

#[derive(Debug, Default)]
struct Schema {
    tables: BTreeMap<String, Table>,
    indexes: BTreeMap<String, Index>,
    /// Breaches of the PostgreSQL type rules (always empty for SQLite).
    rule_breaches: Vec<String>,
}

/// A CHECK's expression reduced to what both databases print alike: the first identifier
/// (the column tested) and the sorted string literals. SQLite keeps `state IN ('a', 'b')`,
/// PostgreSQL prints `CHECK ((state = ANY (ARRAY['a'::text, 'b'::text])))`.
fn normalise_check(expr: &str) -> String {
    let body = expr.trim_start_matches(|c: char| c == '(' || c.is_whitespace());
    let body = body.strip_prefix("CHECK").unwrap_or(body);
    let body = body.trim_start_matches(|c: char| c == '(' || c.is_whitespace());
    let column: String = body
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '"')
        .filter(|c| *c != '"')
        .collect();
    let mut literals: Vec<&str> = expr.split('\'').skip(1).step_by(2).collect();
    literals.sort_unstable();
    let literals: Vec<String> = literals.iter().map(|l| format!("'{l}'")).collect();
    format!("{column}: {}", literals.join(", "))
}

/// A default or a partial index's predicate without PostgreSQL's casts and outer parentheses:
/// `'queued'::text` -> `'queued'`, `(state = 'uploading'::text)` -> `state = 'uploading'`.
/// The keys of `CREATE INDEX name ON table (key, ...) [WHERE ...]`, each normalised.
fn index_keys(create: &str) -> Vec<String> {
    let open = create.find('(').unwrap();
    let (mut depth, mut keys, mut key) = (0, vec![], String::new());
    for c in create[open + 1..].chars() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => break,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                keys.push(normalise_expr(&key));
                key.clear();
                continue;
            }
            _ => {}
        }
        key.push(c);
    }
    keys.push(normalise_expr(&key));
    keys
}

fn normalise_expr(expr: &str) -> String {
    let mut s = expr.trim().to_string();
    for cast in [
        "::text",
        "::bigint",
        "::bytea",
        "::double precision",
        "::integer",
    ] {
        s = s.replace(cast, "");
    }
    while s.starts_with('(') && s.ends_with(')') && balanced(&s[1..s.len() - 1]) {
        s = s[1..s.len() - 1].trim().to_string();
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn balanced(s: &str) -> bool {
    let mut depth = 0i32;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    depth == 0
}

/// SQLite's type affinity rules (https://sqlite.org/datatype3.html, 3.1) as a family.
fn sqlite_family(declared: &str) -> String {
    let t = declared.to_ascii_uppercase();
    if t.contains("INT") {
        "integer"
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        "text"
    } else if t.contains("BLOB") || t.is_empty() {
        "blob"
    } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
        "real"
    } else {
        return format!("other:{declared}");
    }
    .to_string()
}

/// Only the PostgreSQL types the engine decodes (through sqlx) as it does SQLite's.
fn pg_family(formatted: &str) -> String {
    match formatted {
        "bigint" => "integer",
        "text" => "text",
        "bytea" => "blob",
        "double precision" => "real",
        other => return format!("other:{other}"),
    }
    .to_string()
}

fn pg_on_delete(code: &str) -> String {
    match code {
        "a" => "NO ACTION",
        "r" => "RESTRICT",
        "c" => "CASCADE",
        "n" => "SET NULL",
        "d" => "SET DEFAULT",
        other => other,
    }
    .to_string()
}

fn quoted(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

async fn sqlite_schema(pool: &SqlitePool) -> Schema {
    let mut schema = Schema::default();
    let tables: Vec<(String, bool)> = sqlx::query_as(
        "SELECT name, wr FROM pragma_table_list WHERE schema = 'main' AND type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations' ORDER BY name",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (name, without_rowid) in tables {
        let mut table = sqlite_columns(pool, &name, without_rowid).await;
        sqlite_indexes(pool, &name, &mut table, &mut schema.indexes).await;
        table.foreign_keys = sqlite_foreign_keys(pool, &name).await;
        // SQLite keeps the CREATE TABLE text (with the columns later migrations added); its
        // CHECK clauses are read from it, comments left out.
        let sql: String =
            sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = $1")
                .bind(&name)
                .fetch_one(pool)
                .await
                .unwrap();
        let sql: Vec<&str> = sql
            .lines()
            .map(|l| l.split("--").next().unwrap_or(""))
            .collect();
        table.checks = sqlite_checks(&sql.join("\n"));
        table.rows = sqlx::query_scalar(count_rows(&name))
            .fetch_one(pool)
            .await
            .unwrap();
        schema.tables.insert(name, table);
    }
    schema
}

#[derive(sqlx::FromRow)]
struct SqliteColumn {
    name: String,
    declared: String,
    not_null: bool,
    default: Option<String>,
    /// Position in the primary key, from 1; 0 for other columns.
    pk: i64,
}

/// A table's columns and primary key.
async fn sqlite_columns(pool: &SqlitePool, table: &str, without_rowid: bool) -> Table {
    let cols: Vec<SqliteColumn> = sqlx::query_as(
        "SELECT name, type AS declared, \"notnull\" AS not_null, dflt_value AS \"default\", pk \
         FROM pragma_table_info($1) ORDER BY cid",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut pk: Vec<(i64, &str)> = cols
        .iter()
        .filter(|c| c.pk > 0)
        .map(|c| (c.pk, c.name.as_str()))
        .collect();
    pk.sort();
    let primary_key: Vec<String> = pk.into_iter().map(|(_, c)| c.to_string()).collect();
    // A single-column INTEGER PRIMARY KEY of a rowid table is the row id.
    let row_id = match (&primary_key[..], without_rowid) {
        ([only], false) => cols
            .iter()
            .find(|c| &c.name == only && c.declared.eq_ignore_ascii_case("INTEGER"))
            .map(|c| c.name.clone()),
        _ => None,
    };
    let columns = cols
        .into_iter()
        .map(|c| Column {
            row_id: row_id.as_deref() == Some(c.name.as_str()),
            family: sqlite_family(&c.declared),
            // A key column holds no NULL in PostgreSQL; SQLite lets a rowid table's
            // non-integer key hold one (a legacy quirk no code relies on).
            not_null: c.not_null || c.pk > 0,
            default: c.default.as_deref().map(normalise_expr),
            name: c.name,
        })
        .collect();
    Table {
        columns,
        primary_key,
        ..Table::default()
    }
}

/// A table's unique constraints (into `into`) and its explicitly created indexes.
async fn sqlite_indexes(
    pool: &SqlitePool,
    table: &str,
    into: &mut Table,
    indexes: &mut BTreeMap<String, Index>,
) {
    let list: Vec<(String, bool, String, bool)> = sqlx::query_as(
        "SELECT name, \"unique\", origin, partial FROM pragma_index_list($1) ORDER BY name",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    for (index, unique, origin, partial) in list {
        let named: Vec<Option<String>> =
            sqlx::query_scalar("SELECT name FROM pragma_index_info($1) ORDER BY seqno")
                .bind(&index)
                .fetch_all(pool)
                .await
                .unwrap();
        // An expression has no name: the keys are then read from the index's CREATE text.
        let columns: Vec<String> = if named.iter().all(Option::is_some) {
            named.into_iter().flatten().collect()
        } else {
            let sql: String = sqlx::query_scalar(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = $1",
            )
            .bind(&index)
            .fetch_one(pool)
            .await
            .unwrap();
            index_keys(&sql)
        };
        match origin.as_str() {
            "pk" => {}
            "u" => {
                into.uniques.insert(columns);
            }
            _ => {
                let predicate = if partial {
                    let sql: String = sqlx::query_scalar(
                        "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = $1",
                    )
                    .bind(&index)
                    .fetch_one(pool)
                    .await
                    .unwrap();
                    let at = sql.to_ascii_uppercase().rfind(" WHERE ").unwrap();
                    Some(normalise_expr(&sql[at + " WHERE ".len()..]))
                } else {
                    None
                };
                let table = table.to_string();
                let index_row = Index {
                    table,
                    columns,
                    unique,
                    predicate,
                };
                indexes.insert(index, index_row);
            }
        }
    }
}

async fn sqlite_foreign_keys(pool: &SqlitePool, table: &str) -> BTreeSet<ForeignKey> {
    let rows: Vec<(i64, String, String, String, String)> = sqlx::query_as(
        "SELECT id, \"table\", \"from\", \"to\", on_delete FROM pragma_foreign_key_list($1) \
         ORDER BY id, seq",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut by_id: BTreeMap<i64, ForeignKey> = BTreeMap::new();
    for (id, target, from, to, on_delete) in rows {
        let fk = by_id.entry(id).or_insert_with(|| ForeignKey {
            columns: vec![],
            table: target,
            references: vec![],
            on_delete: on_delete.to_ascii_uppercase(),
        });
        fk.columns.push(from);
        fk.references.push(to);
    }
    by_id.into_values().collect()
}

/// The CHECK clauses of a CREATE TABLE text, each normalised.
fn sqlite_checks(sql: &str) -> BTreeSet<String> {
    let upper = sql.to_ascii_uppercase();
    let mut checks = BTreeSet::new();
    let mut from = 0;
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    while let Some(at) = upper[from..].find("CHECK") {
        let start = from + at + "CHECK".len();
        let before = upper[..from + at].chars().next_back();
        let after = sql[start..].trim_start();
        // The keyword, not a name that holds it (`checked_at`).
        if before.is_some_and(ident) || !after.starts_with('(') {
            from = start;
            continue;
        }
        let open = sql.len() - after.len();
        let mut depth = 0;
        let mut end = open;
        for (i, c) in sql[open..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = open + i;
                break;
            }
        }
        checks.insert(normalise_check(&sql[open + 1..end]));
        from = end;
    }
    checks
}

/// `SELECT COUNT(*)` of a table named by the database's own catalog.
fn count_rows(table: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {}", quoted(table)))
}

async fn pg_schema(pool: &PgPool) -> Schema {
    let mut schema = Schema::default();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname <> '_sqlx_migrations' \
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for name in tables {
        let mut table = Table {
            columns: pg_columns(pool, &name, &mut schema.rule_breaches).await,
            ..Table::default()
        };
        pg_constraints(pool, &name, &mut table, &mut schema.rule_breaches).await;
        pg_indexes(pool, &name, &mut schema.indexes).await;
        table.rows = sqlx::query_scalar(count_rows(&name))
            .fetch_one(pool)
            .await
            .unwrap();
        schema.tables.insert(name, table);
    }
    schema
}

#[derive(sqlx::FromRow)]
struct PgColumn {
    name: String,
    formatted: String,
    not_null: bool,
    default: Option<String>,
    /// '' (none), 'd' (BY DEFAULT) or 'a' (ALWAYS).
    identity: String,
    collation: Option<String>,
}

/// A table's columns; breaches of the type rules go to `breaches`.
async fn pg_columns(pool: &PgPool, table: &str, breaches: &mut Vec<String>) -> Vec<Column> {
    let cols: Vec<PgColumn> = sqlx::query_as(
        "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS formatted, \
                a.attnotnull AS not_null, pg_get_expr(d.adbin, d.adrelid) AS \"default\", \
                a.attidentity::text AS identity, co.collname::text AS collation \
         FROM pg_attribute a \
         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
         LEFT JOIN pg_collation co ON co.oid = a.attcollation \
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut columns = vec![];
    for c in cols {
        let (col, family) = (&c.name, pg_family(&c.formatted));
        if family == "text" && c.collation.as_deref() != Some("C") {
            breaches.push(format!(
                "{table}.{col}: text collation is {:?}, not \"C\" (SQLite's byte order)",
                c.collation
            ));
        }
        if family.starts_with("other:") {
            breaches.push(format!(
                "{table}.{col}: type {} is none of bigint, text, bytea, double precision",
                c.formatted
            ));
        }
        if c.identity == "a" {
            breaches.push(format!(
                "{table}.{col}: GENERATED ALWAYS refuses explicit ids; use BY DEFAULT"
            ));
        }
        columns.push(Column {
            family,
            not_null: c.not_null,
            default: c.default.as_deref().map(normalise_expr),
            row_id: !c.identity.is_empty(),
            name: c.name,
        });
    }
    columns
}

#[derive(sqlx::FromRow)]
struct PgConstraint {
    kind: String,
    columns: Option<Vec<String>>,
    target: String,
    references: Option<Vec<String>>,
    on_delete: String,
    definition: String,
}

/// A table's primary key, unique constraints, foreign keys and checks.
async fn pg_constraints(pool: &PgPool, table: &str, into: &mut Table, breaches: &mut Vec<String>) {
    let constraints: Vec<PgConstraint> = sqlx::query_as(
        "SELECT c.contype::text AS kind, \
                (SELECT array_agg(a.attname::text ORDER BY k.ord) \
                 FROM unnest(c.conkey) WITH ORDINALITY k(n, ord) \
                 JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n) AS columns, \
                c.confrelid::regclass::text AS target, \
                (SELECT array_agg(a.attname::text ORDER BY k.ord) \
                 FROM unnest(c.confkey) WITH ORDINALITY k(n, ord) \
                 JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n) \
                    AS \"references\", \
                c.confdeltype::text AS on_delete, pg_get_constraintdef(c.oid) AS definition \
         FROM pg_constraint c WHERE c.conrelid = $1::regclass",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    for c in constraints {
        let columns = c.columns.unwrap_or_default();
        match c.kind.as_str() {
            // NOT NULL constraints (PostgreSQL 18 lists them here) are compared per column.
            "n" => {}
            "p" => into.primary_key = columns,
            "u" => {
                into.uniques.insert(columns);
            }
            "f" => {
                into.foreign_keys.insert(ForeignKey {
                    columns,
                    table: c.target,
                    references: c.references.unwrap_or_default(),
                    on_delete: pg_on_delete(&c.on_delete),
                });
            }
            "c" => {
                into.checks.insert(normalise_check(&c.definition));
            }
            other => breaches.push(format!(
                "{table}: constraint of kind {other}: {}",
                c.definition
            )),
        }
    }
}

#[derive(sqlx::FromRow)]
struct PgIndex {
    name: String,
    unique: bool,
    columns: Vec<String>,
    predicate: Option<String>,
}

/// A table's indexes made by CREATE INDEX (not those backing its own constraints).
async fn pg_indexes(pool: &PgPool, table: &str, into: &mut BTreeMap<String, Index>) {
    let indexes: Vec<PgIndex> = sqlx::query_as(
        "SELECT ic.relname::text AS name, i.indisunique AS \"unique\", \
                (SELECT array_agg(CASE WHEN k.n = 0 \
                                       THEN pg_get_indexdef(i.indexrelid, k.ord::int, true) \
                                       ELSE a.attname::text END ORDER BY k.ord) \
                 FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, ord) \
                 LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n) AS columns, \
                pg_get_expr(i.indpred, i.indrelid) AS predicate \
         FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
         WHERE i.indrelid = $1::regclass AND NOT EXISTS ( \
             SELECT 1 FROM pg_constraint c \
             WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid \
               AND c.contype IN ('p', 'u', 'x'))",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    for i in indexes {
        into.insert(
            i.name,
            Index {
                table: table.to_string(),
                columns: i.columns,
                unique: i.unique,
                predicate: i.predicate.as_deref().map(normalise_expr),
            },
        );
    }
}

/// Every difference between the two schemas, each naming its table (and column or index).
fn differences(sqlite: &Schema, pg: &Schema) -> Vec<String> {
    let mut out = pg.rule_breaches.clone();
    for name in sqlite.tables.keys() {
        if !pg.tables.contains_key(name) {
            out.push(format!("table {name}: in SQLite, missing in PostgreSQL"));
        }
    }
    for name in pg.tables.keys() {
        if !sqlite.tables.contains_key(name) {
            out.push(format!("table {name}: in PostgreSQL, not in SQLite"));
        }
    }
    for (name, s) in &sqlite.tables {
        if let Some(p) = pg.tables.get(name) {
            table_differences(name, s, p, &mut out);
        }
    }
    for (index, s) in &sqlite.indexes {
        match pg.indexes.get(index) {
            None => out.push(format!(
                "index {index} on {}: in SQLite, missing in PostgreSQL",
                s.table
            )),
            Some(p) if p != s => out.push(format!("index {index}: SQLite {s:?}, PostgreSQL {p:?}")),
            Some(_) => {}
        }
    }
    for (index, p) in &pg.indexes {
        if !sqlite.indexes.contains_key(index) {
            out.push(format!(
                "index {index} on {}: in PostgreSQL, not in SQLite",
                p.table
            ));
        }
    }
    out
}

fn table_differences(name: &str, s: &Table, p: &Table, out: &mut Vec<String>) {
    let names = |t: &Table| t.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    let (s_names, p_names) = (names(s), names(p));
    for c in &s_names {
        if !p_names.contains(c) {
            out.push(format!("{name}.{c}: in SQLite, missing in PostgreSQL"));
        }
    }
    for c in &p_names {
        if !s_names.contains(c) {
            out.push(format!("{name}.{c}: in PostgreSQL, not in SQLite"));
        }
    }
    let common = |names: &[String], other: &[String]| -> Vec<String> {
        names
            .iter()
            .filter(|c| other.contains(c))
            .cloned()
            .collect()
    };
    if common(&s_names, &p_names) != common(&p_names, &s_names) {
        out.push(format!(
            "{name}: column order differs: SQLite {s_names:?}, PostgreSQL {p_names:?}"
        ));
    }
    for sc in &s.columns {
        let Some(pc) = p.columns.iter().find(|c| c.name == sc.name) else {
            continue;
        };
        let c = &sc.name;
        if sc.family != pc.family {
            out.push(format!(
                "{name}.{c}: type {} in SQLite, {} in PostgreSQL",
                sc.family, pc.family
            ));
        }
        if sc.not_null != pc.not_null {
            out.push(format!(
                "{name}.{c}: NOT NULL is {} in SQLite, {} in PostgreSQL",
                sc.not_null, pc.not_null
            ));
        }
        if sc.default != pc.default {
            out.push(format!(
                "{name}.{c}: default {:?} in SQLite, {:?} in PostgreSQL",
                sc.default, pc.default
            ));
        }
        if sc.row_id != pc.row_id {
            out.push(format!(
                "{name}.{c}: generated row id is {} in SQLite (INTEGER PRIMARY KEY), {} in \
                 PostgreSQL (GENERATED BY DEFAULT AS IDENTITY)",
                sc.row_id, pc.row_id
            ));
        }
    }
    if s.primary_key != p.primary_key {
        out.push(format!(
            "{name}: primary key {:?} in SQLite, {:?} in PostgreSQL",
            s.primary_key, p.primary_key
        ));
    }
    for (what, sv, pv) in [
        (
            "unique constraints",
            fmt_set(&s.uniques),
            fmt_set(&p.uniques),
        ),
        (
            "foreign keys",
            fmt_set(&s.foreign_keys),
            fmt_set(&p.foreign_keys),
        ),
        ("checks", fmt_set(&s.checks), fmt_set(&p.checks)),
    ] {
        if sv != pv {
            out.push(format!("{name}: {what} {sv} in SQLite, {pv} in PostgreSQL"));
        }
    }
    if s.rows != p.rows {
        out.push(format!(
            "{name}: the migrations leave {} rows in SQLite, {} in PostgreSQL",
            s.rows, p.rows
        ));
    }
}

fn fmt_set<T: std::fmt::Debug>(set: &BTreeSet<T>) -> String {
    format!("{set:?}")
}

async fn sqlite_migrated(dir: &tempfile::TempDir) -> SqlitePool {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("parity.db"))
        .create_if_missing(true)
        .foreign_keys(true);
    let pool = SqlitePool::connect_with(opts).await.unwrap();
    sqlx::migrate!("../migrations").run(&pool).await.unwrap();
    pool
}

async fn pg_migrated(cluster: &PgCluster, database: &str) -> PgPool {
    let url = cluster.create_database(database).unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    sqlx::migrate!("../migrations/postgres")
        .run(&pool)
        .await
        .unwrap();
    pool
}

fn report(diffs: &[String]) -> String {
    format!(
        "{} difference(s) between migrations/*.sql (SQLite) and migrations/postgres/ \
         (PostgreSQL):\n  {}\nhint: a new SQLite migration needs its PostgreSQL twin in \
         migrations/postgres/",
        diffs.len(),
        diffs.join("\n  ")
    )
}

#[tokio::test]
async fn postgres_migrations_build_the_sqlite_schema() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = sqlite_migrated(&dir).await;
    let cluster = PgCluster::start().expect("a throwaway PostgreSQL cluster");
    let pg = pg_migrated(&cluster, "parity").await;

    let s = sqlite_schema(&sqlite).await;
    let p = pg_schema(&pg).await;
    // The reading itself works: a comparison of two empty readings would pass vacuously.
    assert!(
        s.tables.len() >= 25,
        "SQLite tables read: {:?}",
        s.tables.keys()
    );
    assert!(
        s.indexes.contains_key("jobs_by_host") && s.tables["jobs"].checks.len() == 2,
        "SQLite indexes read: {:?}",
        s.indexes.keys()
    );
    let diffs = differences(&s, &p);
    assert!(diffs.is_empty(), "{}", report(&diffs));

    // The comparison names drift: a PostgreSQL schema with a column, an index, an ON DELETE
    // action, a CHECK value and a collation changed is caught on each, by name.
    let drifted = pg_migrated(&cluster, "drifted").await;
    for change in [
        "ALTER TABLE jobs DROP COLUMN host",
        "DROP INDEX schedules_one_scrub",
        "ALTER TABLE root_locks DROP CONSTRAINT root_locks_run_id_fkey",
        "ALTER TABLE root_locks ADD FOREIGN KEY (run_id) REFERENCES runs (id)",
        "ALTER TABLE lane_health DROP CONSTRAINT lane_health_state_check",
        "ALTER TABLE lane_health ADD CHECK (state IN ('ok', 'silent'))",
        "ALTER TABLE hosts ALTER COLUMN last_seen TYPE INTEGER",
        "ALTER TABLE roots ALTER COLUMN path TYPE TEXT COLLATE \"default\"",
    ] {
        sqlx::query(change).execute(&drifted).await.unwrap();
    }
    let diffs = differences(&s, &pg_schema(&drifted).await);
    for expected in [
        "jobs.host: in SQLite, missing in PostgreSQL",
        "index schedules_one_scrub on schedules: in SQLite, missing in PostgreSQL",
        "root_locks: foreign keys",
        "lane_health: checks",
        "hosts.last_seen: type integer is none of",
        "roots.path: text collation",
    ] {
        assert!(
            diffs.iter().any(|d| d.starts_with(expected)),
            "no difference starting {expected:?} in:\n{}",
            diffs.join("\n")
        );
    }
}

#[test]
fn checks_and_expressions_read_alike_from_both_databases() {
    assert_eq!(
        normalise_check("state IN ('uploading', 'stored', 'missing')"),
        normalise_check(
            "CHECK ((state = ANY (ARRAY['uploading'::text, 'stored'::text, 'missing'::text])))"
        )
    );
    assert_ne!(
        normalise_check("state IN ('ok', 'silent', 'lost')"),
        normalise_check("CHECK ((state = ANY (ARRAY['ok'::text, 'silent'::text])))")
    );
    assert_eq!(
        normalise_expr("(kind = 'scrub'::text)"),
        normalise_expr("kind = 'scrub'")
    );
    assert_eq!(normalise_expr("'queued'::text"), "'queued'");
    assert_eq!(normalise_expr("(a) OR (b)"), "(a) OR (b)");
}
