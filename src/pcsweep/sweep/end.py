"""What happens when a pcsweep command ends (a Hydra callback): the table printed and kept as ``summary.csv``, and
the automatic report when a multirun trained something."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pcsweep.config.errors import UserError
from pcsweep.run.files import read_json
from pcsweep.sweep.table import (
    format_table,
    read_manifest,
    row_from_summary,
    sweep_rows,
    tuning_line,
    untuned_line,
    write_csv,
)

log = logging.getLogger(__name__)


class SweepSummaryCallback(Callback):
    """Hydra callback: print the table and write ``summary.csv`` in the sweep folder when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if read_manifest(sweep_dir) is None:
            return
        rows = sweep_rows(sweep_dir)
        write_csv(rows, sweep_dir / "summary.csv")
        table = format_table(rows)
        log.info(
            f"the sweep, also in {sweep_dir / 'summary.csv'}:\n{table}{tuning_line(sweep_dir)}{untuned_line(rows)}"
        )
        if config.report.auto and any(row.get("status") == "complete" for row in rows):
            # the report's plotting libraries (matplotlib, seaborn: seconds) load only when a report is due; Hydra
            # builds this callback at the start of every command
            from pcsweep.report import build_report, claims_overview, log_to_wandb
            from pcsweep.report.claims import ClaimRules

            rules = ClaimRules.from_mapping(
                cast(dict, OmegaConf.to_container(config.report.claims))
                if config.report.get("claims") is not None
                else None
            )
            try:
                html_path = build_report(
                    sweep_dir,
                    tuple(config.report.spans),
                    config.report.resolution,
                    config.report.samples,
                    landscapes=config.report.landscapes,
                    rules=rules,
                )
            except UserError as exc:  # the runs are trained; the report refuses to choose on the test split
                log.warning(f"no report: {exc}")
                return
            log.info(f"report: {html_path}\nthe paper's claims:\n{claims_overview(html_path.parent / 'claims.json')}")
            wandb_node = config.logger.get("wandb")  # the runs' W&B project, entity and mode
            if wandb_node is not None:
                log_to_wandb(html_path, sweep_dir, {k: v for k, v in wandb_node.items() if not k.startswith("_")})

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.runtime.output_dir)
        summary = read_json(run_dir / "summary.json")
        if isinstance(summary, dict):
            log.info(f"the run:\n{format_table([row_from_summary(summary)])}")
