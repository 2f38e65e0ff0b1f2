//! Formats, schemas, chat templates and bad input, through the library's data pipeline.
mod common;
use common::*;
use dpo::data::pipeline::{Pipeline, Settings};
use dpo::data::{Example, PairTokenizer, Template, TokenizedPair};
use std::path::{Path, PathBuf};

fn build(files: &[PathBuf], template: &str) -> anyhow::Result<(Pipeline, dpo::data::audit::Audit)> {
    let dir = model_dir("tiny-llama");
    let tok = PairTokenizer::from_model_dir(&dir).unwrap();
    let template = <dpo::data::template::TemplateChoice as clap::ValueEnum>::from_str(template, true).unwrap();
    Pipeline::build(files, Settings { template, ..Settings::default() }, tok, &dir)
}

fn pairs(file: &Path, template: &str) -> Vec<TokenizedPair> {
    let (p, audit) = build(&[file.to_path_buf()], template).unwrap();
    assert_eq!(audit.rows_skipped, 0, "{:?}", audit.skipped);
    (0..p.len()).map(|i| p.pair(i).unwrap()).collect()
}

fn data(rel: &str) -> PathBuf {
    fixtures().join("data").join(rel)
}

/// `FILE:LINE: ` as an error names a bad row (the colon after the number: line 4 is not line 40).
fn at(file: &Path, line: usize) -> String {
    format!("{}:{line}: ", file.display())
}

fn err(files: &[PathBuf]) -> String {
    match build(files, "auto") {
        Ok((_, a)) => a.check_skip_ratio(0.01).map(|_| "no error".to_string()).unwrap_or_else(|e| format!("{e:#}")),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn every_format_yields_the_same_ids_where_templates_agree() {
    let orca_rows: Vec<serde_json::Value> =
        std::fs::read_to_string(orca("train")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let hh_rows: Vec<serde_json::Value> = std::fs::read_to_string(data("hh-rlhf/train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let orca_ids = pairs(&orca("train"), "chat");
    let uf_parquet = pairs(&data("ultrafeedback_binarized/train_prefs.parquet"), "chat");
    let uf_jsonl = pairs(&data("ultrafeedback_binarized/train_prefs.jsonl"), "chat");
    let hh = pairs(&data("hh-rlhf/train.jsonl"), "chat");
    let hh_gz = pairs(&data("hh-rlhf/train.jsonl.gz"), "chat");
    assert_eq!(uf_parquet, uf_jsonl, "parquet == jsonl");
    assert_eq!(hh, hh_gz, "jsonl.gz == jsonl");
    let mut compared = 0;
    for i in 0..64 {
        let no_system = orca_rows[i]["system"] == "";
        let one_turn = hh_rows[i]["chosen"].as_str().unwrap().matches("\n\nHuman:").count() == 1;
        if no_system {
            assert_eq!(orca_ids[i], uf_parquet[i], "orca vs ultrafeedback, pair {i}");
            if one_turn {
                assert_eq!(orca_ids[i], hh[i], "orca vs hh-rlhf, pair {i}");
                compared += 1;
            }
        }
    }
    assert!(compared >= 3, "compared {compared}");
    // The default template keeps orca rows on the orca template (golden ids).
    assert_eq!(pairs(&orca("train"), "auto")[..8], golden_pairs()[..]);
}

/// The orca pairs rewritten in LLaMA-Factory's Alpaca ranking layout and in Argilla's give the
/// orca layout's token ids, under the default template and under the chat template.
#[test]
fn alpaca_ranking_and_argilla_layouts_give_the_orca_ids() {
    let dir = scratch("data_layouts");
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(orca("train")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let write = |name: &str, f: &dyn Fn(&serde_json::Value) -> serde_json::Value| {
        let path = dir.join(name);
        std::fs::write(&path, rows.iter().map(|r| format!("{}\n", f(r))).collect::<String>()).unwrap();
        path
    };
    let alpaca = write(
        "alpaca.jsonl",
        &|r| serde_json::json!({"system": r["system"], "instruction": r["question"], "input": "", "output": [r["chosen"], r["rejected"]], "history": []}),
    );
    let argilla = write(
        "argilla.jsonl",
        &|r| serde_json::json!({"system": r["system"], "instruction": r["question"], "chosen_response": r["chosen"], "rejected_response": r["rejected"]}),
    );
    for template in ["auto", "chat"] {
        let want = pairs(&orca("train"), template);
        assert_eq!(pairs(&alpaca, template), want, "alpaca-ranking, --template {template}");
        assert_eq!(pairs(&argilla, template), want, "argilla, --template {template}");
    }
    // A malformed ranking row is named by file:line and field.
    let bad = dir.join("bad.jsonl");
    let mut text = std::fs::read_to_string(&alpaca).unwrap();
    text.push_str("{\"instruction\": \"q\", \"input\": \"\", \"output\": [\"only one\"]}\n");
    std::fs::write(&bad, text).unwrap();
    let e = err(&[bad]);
    assert!(e.contains("bad.jsonl:65") && e.contains("output"), "{e}");
}

#[test]
fn chat_template_renders_what_transformers_renders() {
    let dir = model_dir("tiny-llama");
    let src = dpo::data::chat::find_template(&dir).unwrap();
    let t = dpo::data::chat::ChatTemplate::new(&src, "<s>", "</s>").unwrap();
    let tpl =
        Template::resolve(dpo::data::template::TemplateChoice::Chat, dpo::data::schema::Format::Orca, Some(t)).unwrap();
    let r = tpl.render(&Example::orca("Be kind.", "What is 1 plus 1?", "It is 2.", "3")).unwrap();
    assert_eq!(r.prompt, "<s><|system|>\nBe kind.</s>\n<|user|>\nWhat is 1 plus 1?</s>\n<|assistant|>\n");
    assert_eq!(r.chosen, "It is 2.</s>\n");
    assert_eq!(r.rejected, "3</s>\n");
    assert!(r.bos_in_text && !r.append_eos);
    let tok = PairTokenizer::from_model_dir(&dir).unwrap();
    let (pair, checks) = tok.tokenize(&r).unwrap();
    assert_eq!(pair.prompt.iter().filter(|&&t| t == 1).count(), 1, "BOS exactly once");
    assert!(!checks.double_bos && !checks.boundary_mismatch);
    assert!(pair.chosen.contains(&2) && *pair.chosen.last().unwrap() != 2, "</s> then \\n, no extra EOS");
}

#[test]
fn json_array_and_data_object_read_like_jsonl() {
    let dir = scratch("data_json");
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(orca("test")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    std::fs::write(dir.join("a.json"), serde_json::to_string(&rows).unwrap()).unwrap();
    std::fs::write(dir.join("b.json"), serde_json::json!({ "data": rows }).to_string()).unwrap();
    let want = pairs(&orca("test"), "auto");
    assert_eq!(pairs(&dir.join("a.json"), "auto"), want);
    assert_eq!(pairs(&dir.join("b.json"), "auto"), want);
}

#[test]
fn bad_inputs_fail_naming_file_line_and_field() {
    let dir = scratch("data_bad");
    let good: Vec<String> = std::fs::read_to_string(orca("test")).unwrap().lines().map(String::from).collect();
    let write = |name: &str, extra: &[u8]| -> PathBuf {
        let p = dir.join(name);
        let mut bytes = good[..3].join("\n").into_bytes();
        bytes.push(b'\n');
        bytes.extend_from_slice(extra);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let bad = write("malformed.jsonl", b"{\"question\": \"x\"\n");
    let e = err(std::slice::from_ref(&bad));
    assert!(e.contains(&at(&bad, 4)) && e.contains("malformed JSON"), "{e}");
    let bad = write("types.jsonl", b"{\"question\": \"x\", \"chosen\": 3, \"rejected\": \"r\"}\n");
    let e = err(std::slice::from_ref(&bad));
    assert!(e.contains(&at(&bad, 4)) && e.contains("\"chosen\" must be a string"), "{e}");
    let bad = write("empty.jsonl", b"{\"question\": \"x\", \"chosen\": \"\", \"rejected\": \"r\"}\n");
    let e = err(std::slice::from_ref(&bad));
    assert!(e.contains(&at(&bad, 4)) && e.contains("empty response"), "{e}");
    let bad = write("utf8.jsonl", b"{\"question\": \"\xff\", \"chosen\": \"a\", \"rejected\": \"r\"}\n");
    let e = err(std::slice::from_ref(&bad));
    assert!(e.contains(&at(&bad, 4)) && e.contains("UTF-8"), "{e}");
    let cols = dir.join("cols.jsonl");
    std::fs::write(&cols, "{\"instruction\": \"x\", \"output\": \"y\"}\n").unwrap();
    let e = err(std::slice::from_ref(&cols));
    assert!(e.contains(&at(&cols, 1)) && e.contains("instruction, output"), "{e}");
    let zero = dir.join("zero.jsonl");
    std::fs::write(&zero, "not json\n").unwrap();
    let e = err(std::slice::from_ref(&zero));
    assert!(e.contains("no usable rows") && e.contains(&format!("{}malformed JSON", at(&zero, 1))), "{e}");
    let tok = PairTokenizer::from_model_dir(&model_dir("tiny-llama")).unwrap();
    // An unknown --format is a usage error (exit 2) listing the formats.
    let o = dpo(&[
        "data",
        "inspect",
        "--model",
        p(&model_dir("tiny-llama")),
        "--dataset",
        p(&orca("test")),
        "--format",
        "sharegpt",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("sharegpt") && stderr(&o).contains("hh-rlhf"), "{}", stderr(&o));
    let tpl = dir.join("t.jinja");
    std::fs::write(&tpl, "{{ raise_exception('roles must alternate') }}").unwrap();
    let s = Settings { template_file: Some(tpl), ..Settings::default() };
    let e = Pipeline::build(&[orca("test")], s, tok.clone(), &model_dir("tiny-llama"))
        .and_then(|(_, a)| a.check_skip_ratio(0.01))
        .err();
    let e = e.map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(e.contains("roles must alternate") && e.contains(&at(&orca("test"), 1)), "{e}");
    let nope = dir.join("nope.jinja");
    let s = Settings { template_file: Some(nope.clone()), ..Settings::default() };
    let e = Pipeline::build(&[orca("test")], s, tok, &model_dir("tiny-llama")).err().map(|e| format!("{e:#}"));
    assert!(e.as_ref().is_some_and(|e| e.contains(p(&nope))), "a missing template file is named: {e:?}");
    let e = err(&[orca("test"), data("ultrafeedback_binarized/test_prefs.parquet")]);
    // Orca's columns, fixed by the first file, are missing from every row of the parquet file.
    let parquet = data("ultrafeedback_binarized/test_prefs.parquet");
    assert!(e.contains("32 of 64 rows are unusable"), "{e}");
    assert!(e.contains(&format!("{}: row 1: missing field \"question\"", parquet.display())), "{e}");
}

#[test]
fn a_split_whose_parquet_files_differ_in_schema_is_refused_naming_both() {
    // A dataset folder whose train split is two parquet shards with different columns.
    let o = std::process::Command::new(bin())
        .args(["data", "inspect", "--model"])
        .arg(model_dir("tiny-llama"))
        .arg("--dataset")
        .arg(data("mixed_schema"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("train-00001-of-00002.parquet") && e.contains("train-00000-of-00002.parquet"), "{e}");
    assert!(e.contains("share one schema") && e.contains("question") && e.contains("messages"), "{e}");
}
