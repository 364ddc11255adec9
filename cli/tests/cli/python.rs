//! `--python`: Python sessions from the command line.

use super::*;

fn with_python() -> Command {
    let mut cmd = malt();
    cmd.env(malt::python::COMPONENT_ENV, guests::python_guest());
    cmd
}

#[test]
fn eval_and_call_run_python() {
    with_python()
        .args([
            "eval",
            "--python",
            "import statistics\nstatistics.mean([1, 2, 3, 7])",
        ])
        .assert()
        .success()
        .stdout("3.25\n");
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("grades.py");
    std::fs::write(
        &module,
        "def grade(score):\n    if score < 0:\n        raise ValueError('negative score')\n    return 'pass' if score >= 50 else 'fail'\n",
    )
    .unwrap();
    with_python()
        .args(["call", "--python"])
        .arg(&module)
        .args(["grade", "72"])
        .assert()
        .success()
        .stdout("\"pass\"\n");
    // The traceback names the user's file and line.
    with_python()
        .args(["call", "--python"])
        .arg(&module)
        .args(["grade", "--", "-1"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("grades.py\", line 3, in grade"))
        .stderr(predicate::str::contains("ValueError: negative score"));
}

/// What the guest printed without a line end is written out: a one-shot
/// kills its worker instead of waiting for its stream to end.
#[test]
fn a_line_printed_without_its_end_is_not_lost() {
    with_python()
        .args(["eval", "--python", "print('no end', end='')\n1"])
        .assert()
        .success()
        .stdout("no end\n1\n");
}

#[test]
fn without_the_component_python_says_what_to_run() {
    malt()
        .env(malt::python::COMPONENT_ENV, "/nonexistent/python.wasm")
        .args(["eval", "--python", "1 + 1"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("malt build-python"))
        .stderr(predicate::str::contains("componentize-py==0.25.1"));
}

/// The documented build command: it writes a component that runs.
#[test]
fn build_python_writes_a_working_component() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("python.wasm");
    malt()
        .timeout(std::time::Duration::from_secs(300))
        .args(["build-python", "-o"])
        .arg(&out)
        .assert()
        .success()
        .stdout(format!("{}\n", out.display()));
    let eval = |code: &str, shown: &str| {
        malt()
            .env(malt::python::COMPONENT_ENV, &out)
            .args(["eval", "--python", code])
            .assert()
            .success()
            .stdout(format!("{shown}\n"));
    };
    eval("'-'.join(['a', 'b'])", "\"a-b\"");
    // And the rest of the standard library beside it.
    assert!(malt::python::stdlib_dir(&out).join("difflib.py").is_file());
    eval("import shlex; shlex.join(['a', 'b c'])", "\"a 'b c'\"");
}
