"""AWX / Tower: the execution environment definition (ansible-builder create, no network), the collection's
own EE metadata (ansible-builder's introspection, bindep), and the example job templates, surveys and
inventories of examples/awx (every playbook and variable they name exists; the inventories parse)."""

import os
import re
import shutil
import subprocess
import sys
import tarfile

import yaml

from module_runner import COLLECTIONS, ROOT

AWX = os.path.join(ROOT, "examples", "awx")
BIN = os.path.dirname(sys.executable)
SURVEY_TYPES = {"text", "textarea", "password", "integer", "float", "multiplechoice", "multiselect"}


def load(path):
    with open(path) as fh:
        return yaml.safe_load(fh)


def run(argv, **kwargs):
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300, **kwargs)
    assert proc.returncode == 0, "%s exited %d\n%s\n%s" % (argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_ansible_builder_create_makes_the_build_context(tmp_path):
    builder = os.path.join(BIN, "ansible-builder")
    work = tmp_path / "ee"
    work.mkdir()
    for name in ("execution-environment.yml", "requirements.yml"):
        shutil.copy(os.path.join(AWX, name), work / name)
    run([builder, "create", "-f", "execution-environment.yml", "--context", str(work / "context"),
         "--output-filename", "Containerfile"], cwd=work)
    containerfile = (work / "context" / "Containerfile").read_text()
    assert "ARG EE_BASE_IMAGE=\"quay.io/fedora/fedora:40\"" in containerfile
    assert "ansible-galaxy collection install" in containerfile and "requirements.yml" in containerfile
    assert "/usr/bin/dnf" in containerfile and "ansible-core>=2.19,<2.20" in containerfile
    assert load(work / "context" / "_build" / "requirements.yml") == load(os.path.join(AWX, "requirements.yml"))
    assert "snapchain.vmbackup" in [c["name"] for c in load(os.path.join(AWX, "requirements.yml"))["collections"]]

    # The context's own introspection script (what runs inside the build) reads the collection's
    # meta/execution-environment.yml: our Python and system requirements come out, named after us.
    script = work / "context" / "_build" / "scripts" / "introspect.py"
    out = load_text(run([sys.executable, str(script), "introspect", COLLECTIONS]).stdout)
    system = [line for line in out["system"] if "snapchain.vmbackup" in line]
    python = [line for line in out["python"] if "snapchain.vmbackup" in line]
    for package in ("python3-rbd", "python3-rados", "python3-libvirt", "python3-libnbd", "qemu-utils",
                    "qemu-system-common", "fuse3", "rsync"):
        assert any(line.startswith(package + " ") for line in system), (package, system)
    assert any(line.startswith("jmespath") for line in python) and any(line.startswith("xxhash") for line in python)

    # create validates the definition: an unknown key is refused, nothing is written
    broken = load(work / "execution-environment.yml")
    broken["dependencies"]["pyhton"] = "requirements.txt"
    with open(work / "broken.yml", "w") as fh:
        yaml.safe_dump(broken, fh)
    proc = subprocess.run([builder, "create", "-f", "broken.yml", "--context", str(work / "broken")], cwd=work,
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "pyhton" in proc.stdout + proc.stderr
    assert not (work / "broken" / "Containerfile").exists()


def load_text(text):
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict), text
    return doc


def test_collection_ee_metadata_is_shipped_and_bindep_is_satisfied(tmp_path):
    meta = load(os.path.join(ROOT, "meta", "execution-environment.yml"))
    assert meta == {"version": 1, "dependencies": {"python": "requirements.txt", "system": "bindep.txt"}}
    # bindep -b prints the packages of bindep.txt this platform (Debian: dpkg) lacks; the lab's install
    # (tests/lab/snaplab.py PACKAGES) installs them all, so none may be missing
    proc = subprocess.run([os.path.join(BIN, "bindep"), "-b", "-f", os.path.join(ROOT, "bindep.txt")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr
    # the collection tarball carries them (ansible-builder reads them from the installed collection)
    run([os.path.join(BIN, "ansible-galaxy"), "collection", "build", "--output-path", str(tmp_path), ROOT])
    tarball = next(p for p in os.listdir(tmp_path) if p.endswith(".tar.gz"))
    with tarfile.open(tmp_path / tarball) as tar:
        names = set(tar.getnames())
    assert {"meta/execution-environment.yml", "bindep.txt", "requirements.txt"} <= names


def role_options(role):
    spec = load(os.path.join(ROOT, "roles", role, "meta", "argument_specs.yml"))
    return spec["argument_specs"]["main"]["options"]


def playbook_variables(path):
    """(the roles a playbook runs, the variables it names itself, its hosts pattern's default group)."""
    with open(path) as fh:
        text = fh.read()
    plays = yaml.safe_load(text)
    roles = []
    for play in plays:
        for role in play.get("roles", []):
            name = role["role"] if isinstance(role, dict) else role
            roles.append(name.split(".")[-1])
    own = set(re.findall(r"\{\{\s*([a-z_]+)\s*\|\s*default", text))
    hosts = plays[0]["hosts"]
    group = re.search(r"default\('([^']+)'\)", hosts)
    return roles, own, group.group(1) if group else hosts


def test_job_templates_name_existing_playbooks_and_variables():
    templates = load(os.path.join(AWX, "job_templates.yml"))["snapchain_job_templates"]
    inventory_groups = set(load(os.path.join(AWX, "inventory", "static.yml"))["all"]["children"])
    seen_playbooks = set()
    for template in templates:
        name = template["name"]
        path = os.path.join(ROOT, template["playbook"])
        assert os.path.isfile(path), (name, template["playbook"])
        seen_playbooks.add(os.path.basename(path))
        assert template["job_type"] in ("run", "check"), name
        roles, own, group = playbook_variables(path)
        assert group in inventory_groups, (name, group)
        options = {}
        for role in roles:
            options.update(role_options(role))
        for question in template["survey_spec"]["spec"]:
            var = question["variable"]
            assert var in options or var in own, (name, var, sorted(options))
            assert question["type"] in SURVEY_TYPES, (name, var)
            assert question["question_name"] and isinstance(question["required"], bool), (name, var)
            option = options.get(var, {})
            kind = option.get("type")
            if question["type"] in ("integer", "float"):
                assert kind == ("int" if question["type"] == "integer" else "float"), (name, var, kind)
                assert question["min"] <= question["default"] <= question["max"], (name, var)
            elif question["type"] == "multiplechoice":
                assert question["default"] in question["choices"], (name, var)
                assert set(question["choices"]) <= set(option.get("choices", question["choices"])), (name, var)
            elif question["type"] == "textarea":
                assert kind in ("raw", "str"), (name, var, kind)  # a survey gives a string
            else:
                assert kind in ("str", "path"), (name, var, kind)  # never a bool or a list from a text field
            if "default" in question and kind in ("str", "path") and var in options:
                assert question["default"] in (option.get("default"), "", "latest"), (name, var)
    assert {"backup.yml", "restore.yml", "verify.yml", "prune.yml", "file_restore.yml"} <= seen_playbooks


def test_inventories_parse_and_discovery_playbook_checks(tmp_path):
    inventory = os.path.join(AWX, "inventory", "static.yml")
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="0")
    listed = load_text(run([os.path.join(BIN, "ansible-inventory"), "-i", inventory, "--list", "--yaml"],
                           env=env).stdout)
    children = listed["all"]["children"]
    assert set(children["rbd_backup"]["hosts"]) == {"backup1.example.org", "backup2.example.org"}
    assert set(children["hypervisors"]["hosts"]) == {"hv1.example.org", "hv2.example.org"}
    assert children["hypervisors"]["hosts"]["hv2.example.org"]["vm_backup_domains"] == ["db*", "web*"]

    plugin = load(os.path.join(AWX, "inventory", "libvirt.yml"))
    assert plugin["plugin"] == "community.libvirt.libvirt" and plugin["uri"].startswith("qemu")
    # the options of community.libvirt's inventory plugin (and the constructed options it extends)
    assert set(plugin) <= {"plugin", "uri", "inventory_hostname", "compose", "groups", "keyed_groups", "strict",
                           "use_extra_vars", "leading_separator"}

    for playbook in ("discover.yml",):
        run([os.path.join(BIN, "ansible-playbook"), "--syntax-check", "-i", inventory,
             os.path.join(AWX, playbook)], env=env)
    for playbook in sorted(os.listdir(os.path.join(ROOT, "playbooks"))):
        if playbook.endswith(".yml"):
            run([os.path.join(BIN, "ansible-playbook"), "--syntax-check", "-i", inventory,
                 os.path.join(ROOT, "playbooks", playbook)], env=env)


def test_static_inventory_groups_set_only_variables_the_roles_take():
    inventory = load(os.path.join(AWX, "inventory", "static.yml"))
    children = inventory["all"]["children"]
    known = set()
    for role in ("rbd_backup", "prune", "verify", "vm_backup"):
        known.update(role_options(role))
    for group in children.values():
        for var in group.get("vars", {}):
            assert var in known, var
