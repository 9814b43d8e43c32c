-- nemoclaw journal, schema version 2: events record the rows they create and change.
-- Forward-only: never edit a released migration; add 0003_*.sql instead.
--
-- No table changes. From this version on, `run_created` records every column of the new run
-- (`data.row`) and of its steps (`data.step_rows`), and every later event that changes a run or
-- a step records that row's changeable columns as they are after the change (`data.row`). The
-- hash chain covers `data`, so it covers the rows: `journal verify` replays the images and names
-- any stored column that differs (see journal-schema/README.md).
--
-- Runs created before this migration keep their old events, which record only part of the run
-- (lock, plan, fingerprint, sandbox, gateway, mode, pid, host, step names). This fact says
-- where the journal was upgraded, for auditors; `journal verify` decides per run from the run's
-- own `run_created` event, which the chain protects, and does not trust this row.
INSERT INTO meta (key, value)
SELECT 'row_images_from_event',
       CAST(coalesce((SELECT max(id) FROM events),
                     (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'pruned_head_id'),
                     0) + 1 AS TEXT);
