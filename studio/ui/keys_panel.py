"""The "API keys" accordion: a user creates, sees and revokes their own keys for the
OpenAI-compatible /v1 (workers.api_keys). A new key is shown once, right after it is
made; the list shows only its first characters. Admins list everyone's keys."""

from __future__ import annotations

from typing import Optional

import gradio as gr

from workers import api_keys

from .common import Ctx

COLUMNS = ["id", "name", "key starts", "owner", "created", "state"]


class KeysPanel:
    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        gr.Markdown("Keys for the OpenAI-compatible API at `/v1` (`Authorization: Bearer <key>`; see "
                    "docs/serving.md). A key sees what you see here.", elem_id="keys-help")
        with gr.Row():
            self.name = gr.Textbox(label="new key's name", placeholder="laptop, eval-bot, ...", elem_id="keys-name",
                                   scale=3)
            self.create = gr.Button("Create key", variant="primary", elem_id="keys-create", scale=1)
        self.shown = gr.Textbox(label="your new key (shown only now: copy it)", interactive=False,
                                visible=False, elem_id="keys-new", buttons=["copy"])
        self.table = gr.Dataframe(headers=COLUMNS, value=[], interactive=False, elem_id="keys-table")
        with gr.Row():
            self.revoke_id = gr.Number(None, precision=0, minimum=1, label="key id", elem_id="keys-revoke-id",
                                       scale=1)
            self.revoke = gr.Button("Revoke", variant="stop", elem_id="keys-revoke", scale=1)
        self.msg = gr.Markdown(elem_id="keys-msg")

    def _user(self, request: Optional[gr.Request]) -> Optional[str]:
        return self.ctx.user(request)

    def _everyone(self, request) -> bool:
        u = self._user(request)
        return bool(self.ctx.auth) and self.ctx.auth.is_admin(u)

    def rows(self, request: Optional[gr.Request] = None) -> list[list]:
        keys = api_keys.list_keys(self.ctx.settings.database_url, self._user(request),
                                  everyone=self._everyone(request))
        return [[k["id"], k["name"], k["prefix"] + "…", k["owner"] or "-", (k["created_at"] or "")[:19],
                 f"revoked {(k['revoked_at'] or '')[:19]}" if k["revoked_at"] else "active"] for k in keys]

    def on_create(self, name: str, request: gr.Request):
        try:
            row, key = api_keys.create_key(self.ctx.settings.database_url, self._user(request), name)
        except api_keys.ApiKeyError as e:
            return gr.update(visible=False, value=""), self.rows(request), f"✗ {e}", name
        note = "" if self.ctx.auth else " Login is off, so /v1 is open and needs no key."
        return (gr.update(visible=True, value=key), self.rows(request),
                f"✓ key {row['id']} ({row['name']}) created.{note}", "")

    def on_revoke(self, key_id, request: gr.Request):
        if not key_id:
            return self.rows(request), "✗ key id: type the id of the key to revoke (first column)"
        ok = api_keys.revoke_key(self.ctx.settings.database_url, self._user(request), int(key_id),
                                 everyone=self._everyone(request))
        return self.rows(request), f"✓ key {int(key_id)} revoked" if ok else f"✗ key id: no key {int(key_id)} of yours"

    def wire(self, demo: gr.Blocks) -> None:
        self.create.click(self.on_create, [self.name], [self.shown, self.table, self.msg, self.name])
        self.revoke.click(self.on_revoke, [self.revoke_id], [self.table, self.msg])
        demo.load(self.rows, None, [self.table])
