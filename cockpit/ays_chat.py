"""The chat commands' work (``telegram`` input events for the robot) and the replies they get.

``repo.create``, ``repo.delete``, ``bp.create``, ``bp.execute`` and ``service.execute`` do
what they say; ``repo.list``, ``bp.list``, ``bp.show``, ``bp.delete``, ``service.list`` and
``service.show`` answer what the chat asks to see. Each answer goes back to the chat as a
``telegram`` output event (``action: message``), and each command is recorded as a run of
the robot's own (``service`` null).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Generator

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from cockpit import repos as model
from cockpit.events import TelegramEvent
from cockpit.repos import Invalid, NotFound
from cockpit.runs import Run, new_run_id

if TYPE_CHECKING:
    from cockpit.ays import Robot

log = Logger()

CHAT_ACTIONS = ("repo.create", "repo.delete", "bp.create", "bp.execute", "service.execute",
                # what the chat asks to see
                "repo.list", "bp.list", "bp.show", "bp.delete", "service.list", "service.show")


class ChatWork:
    """What the robot does for one chat command, and the reply it gives."""

    def __init__(self, robot: "Robot"):
        self.robot = robot
        self.catalog = robot.catalog

    def _repo(self, args: dict[str, Any]) -> str:
        if args.get("repo"):
            return str(args["repo"])
        names = self.catalog.repo_names()
        if len(names) == 1:
            return names[0]
        raise Invalid("which repository? give it as args.repo; there are: " + (", ".join(names) or "none yet"))

    def _find_service(self, args: dict[str, Any]) -> tuple[str, str]:
        key = str(args.get("name") or args.get("service") or "")
        model.split_key(key)
        if args.get("repo"):
            return str(args["repo"]), key
        found = [name for name in self.catalog.repo_names() if key in self.catalog.repos[name].services]
        if len(found) != 1:
            raise NotFound(f"no service {key!r} in any repository" if not found else
                           f"service {key!r} is in several repositories ({', '.join(found)}); give args.repo")
        return found[0], key

    @inlineCallbacks
    def handle(self, event: TelegramEvent, trig: dict[str, Any]) -> Generator[Deferred[Any], Any, None]:
        """Do the command, answer in the chat, and record it as a run; ``trig`` is the run's trigger."""
        args = event.args
        action = event.action
        clock = self.robot.clock
        repo = str(args.get("name", "")) if action in ("repo.create", "repo.delete") else str(args.get("repo", ""))
        run = Run(repo, None, action, trig, new_run_id(clock.seconds()), state="running", started=clock.seconds())
        try:
            reply = yield self._do(run, args, event)
            run.state = "ok"
        except model.AysError as exc:
            run.state, reply = "error", f"{action} failed: {exc}"
        run.ended = clock.seconds()
        run.log = reply + "\n"
        chat_id = args.get("chat_id")
        if chat_id is not None:
            yield self.robot.bus.publish(TelegramEvent(io="output", action="message", source="ays",
                                                       args={"chat_id": chat_id, "msg": reply}))
        else:
            log.info("chat command {action} had no chat_id to answer: {reply}", action=action, reply=reply)
        yield self.robot.record(run)

    @inlineCallbacks
    def _do(self, run: Run, args: dict[str, Any], event: TelegramEvent) -> Generator[Deferred[Any], Any, str]:
        """Fires with the reply, naming in ``run.repo`` the repository as soon as it is known; AysError
        says why the command failed."""
        catalog, action, trig, repo = self.catalog, run.action, run.trigger, run.repo
        if action == "repo.create":
            yield catalog.create_repo(str(args.get("name", "")))
            return f"Repository {repo} created."
        if action == "repo.delete":
            yield catalog.delete_repo(str(args.get("name", "")))
            return f"Repository {repo} deleted."
        if action == "repo.list":
            names = catalog.repo_names()
            return (("Repositories:\n" + "\n".join(f"- {name}" for name in names)) if names else
                    "There is no repository yet. /repo create NAME makes one.")
        if action in ("service.show", "service.execute"):
            run.repo, key = self._find_service(args)
            if action == "service.show":
                service = catalog.get_service(run.repo, key)
                template = catalog.repo(run.repo).templates.get(service["template"])
                states = ", ".join(f"{a}: {st}" for a, st in sorted(service["states"].items())) or "no runs yet"
                return (f"{key} in {run.repo} (template {service['template']})\nargs: "
                        f"{json.dumps(service['args'], sort_keys=True)}\nstates: {states}\n"
                        f"actions: {', '.join(sorted(template.actions)) if template else 'none'}")
            _, d = self.robot.start_run(run.repo, key, str(args.get("action", "")), trig, event.to_dict())
            done = yield d
            return f"{key} {done.action}: {done.state}" + (f"\n{done.log[-3000:]}" if done.log else "")
        run.repo = repo = self._repo(args)
        if action in ("bp.create", "bp.execute"):
            name = model.blueprint_name(str(args.get("name", "")))
            said = f"Blueprint {name} executed in {repo}."
            if action == "bp.create":
                # as the original bot's /blueprint add: a blueprint sent from the chat is stored and executed
                yield catalog.add_blueprint(repo, name, args.get("content"), create=not args.get("replace"))
                said = f"Blueprint {name} stored in {repo} and executed."
            _, finished = yield self.robot.execute_blueprint(repo, name, trig)
            done = yield finished
            lines = [f"{r.service} install: {r.state}" for r in done]
            return said + ("\n" + "\n".join(lines) if lines else " No service has an install action.")
        if action == "bp.list":
            blueprints = catalog.list_blueprints(repo)
            return ((f"Blueprints in {repo}:\n" + "\n".join(
                f"- {bp['name']} ({bp['state']})" for bp in blueprints)) if blueprints else
                f"There is no blueprint in {repo} yet.")
        if action == "bp.show":
            blueprint = yield catalog.get_blueprint(repo, str(args.get("name", "")))
            error = f"\nLast error: {blueprint['error']}" if blueprint.get("error") else ""
            return f"{blueprint['name']} in {repo} ({blueprint['state']}){error}\n{blueprint['content']}"
        if action == "bp.delete":
            name = model.blueprint_name(str(args.get("name", "")))
            yield catalog.delete_blueprint(repo, name)
            return f"Blueprint {name} deleted from {repo}."
        # service.list
        role = str(args.get("role") or "")
        services = [s for s in catalog.list_services(repo) if not role or s["role"] == role]
        if not services:
            return f"There is no service in {repo}" + (f" with the role {role}." if role else " yet.")
        return f"Services in {repo}:\n" + "\n".join(
            f"- {s['key']} " + (", ".join(f"{a}: {st}" for a, st in sorted(s["states"].items()) if st != "new")
                                or "no runs yet") for s in services)
