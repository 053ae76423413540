-- The public surface of schema webhook as the catalog sees it: every function (arguments with
-- their defaults, result, volatility, rights, pinned settings), every table and view with its
-- columns, and the status enum. A renamed argument or column, a changed default or type, or a new
-- or vanished object shows up here as a diff. Objects whose names start with "_" are private.
\set SHOW_CONTEXT never

-- How many public objects of each kind the extension has in schema webhook (private ones,
-- named "_…", are left out), and its event trigger.
SELECT o.type AS kind, count(*) AS objects
  FROM pg_depend d, LATERAL pg_identify_object(d.classid, d.objid, 0) o
 WHERE d.refclassid = 'pg_extension'::regclass
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'webhook_ext')
   AND d.deptype = 'e'
   AND ((o.schema = 'webhook' AND o.identity !~ '^webhook\._') OR o.type = 'event trigger')
   -- PostgreSQL 17 and later also record the row and array types of the extension's tables
   -- and views as members; they are not objects of their own here.
   AND NOT (d.classid = 'pg_type'::regclass
            AND EXISTS (SELECT FROM pg_type t WHERE t.oid = d.objid AND (t.typrelid <> 0 OR t.typcategory = 'A')))
 GROUP BY 1 ORDER BY 1;

-- Every public function, one record each (unaligned, so a change touches only its own lines).
\pset format unaligned
\x on
SELECT p.proname AS name,
       pg_get_function_arguments(p.oid) AS arguments,
       pg_get_function_result(p.oid) AS result,
       CASE p.provolatile WHEN 'i' THEN 'immutable' WHEN 's' THEN 'stable' ELSE 'volatile' END AS volatility,
       p.proisstrict AS strict,
       p.prosecdef AS security_definer,
       l.lanname AS language,
       p.proconfig AS settings
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE p.pronamespace = 'webhook'::regnamespace AND p.proname !~ '^_'
 ORDER BY p.proname, pg_get_function_identity_arguments(p.oid);
\x off
\pset format aligned

-- Every SQL and PL/pgSQL function, private ones included, pins search_path (names listed here
-- are the ones that do not: none).
SELECT p.proname AS without_pinned_search_path
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE p.pronamespace = 'webhook'::regnamespace AND l.lanname IN ('sql', 'plpgsql')
   AND NOT ('search_path=pg_catalog, pg_temp' = ANY (coalesce(p.proconfig, '{}')))
 ORDER BY 1;

-- Every public table and view with its columns in order (name, type, NOT NULL).
SELECT c.relname AS relation,
       CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' WHEN 'p' THEN 'partitioned table' END AS kind,
       row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum) AS "#",
       a.attname AS column,
       format_type(a.atttypid, a.atttypmod) AS type,
       a.attnotnull AS not_null
  FROM pg_class c
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE c.relnamespace = 'webhook'::regnamespace AND c.relkind IN ('r', 'v', 'p') AND c.relname !~ '^_'
 ORDER BY c.relname, a.attnum;

-- Column defaults of the public tables (what an INSERT by hand, or a restored dump, gets).
SELECT c.relname AS "table", a.attname AS column, pg_get_expr(d.adbin, d.adrelid) AS "default",
       a.attidentity <> '' AS identity
  FROM pg_class c
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
 WHERE c.relnamespace = 'webhook'::regnamespace AND c.relkind = 'r' AND c.relname !~ '^_'
   AND (d.adbin IS NOT NULL OR a.attidentity <> '')
 ORDER BY 1, a.attnum;

-- CHECK constraints of the public tables (the backstop behind the functions' own checks).
SELECT c.conrelid::regclass AS "table", c.conname, pg_get_constraintdef(c.oid) AS definition
  FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid
 WHERE c.connamespace = 'webhook'::regnamespace AND c.contype = 'c' AND r.relname !~ '^_'
 ORDER BY 1, 2;

-- The delivery statuses, in order.
SELECT enum_range(NULL::webhook.delivery_status) AS delivery_status;
