"""Interop check, run by hand with a Python that has torch, transformers, peft and
mlflow (e.g. ~/.cache/tunebook/refvenv), `tunebook` on PATH and the SmolLM2 GGUF:

    ~/.cache/tunebook/refvenv/bin/python lib/tests/data/check_mlflow_transformers_load.py

1. Fine-tunes a LoRA adapter on the SmolLM2 GGUF for a few steps with `tunebook train`
   and registers it in a throw-away `tunebook mlflow up` server.
2. Moves nothing, but hides the GGUF from the loader (HF_HUB_OFFLINE=1, a copy of the
   registered model downloaded elsewhere): `mlflow.transformers.load_model` must build the
   base from the uploaded `model/` folder and apply `peft/`.
3. Greedy answers of the MLflow-loaded pipeline model equal `tunebook generate` on the run.
4. The `--hf` export of the run loads in transformers with the same greedy answers.
Prints what it compared; exits non-zero on a mismatch. Needs no GPU (about 2 minutes).
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
GGUF = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", os.path.expanduser("~/.cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
QUESTIONS = ["Rewrite the date as YYYY-MM-DD. Answer with the date only.\nDate: 6 Aug. 2017",
             "Rewrite the date as YYYY-MM-DD. Answer with the date only.\nDate: Dec 28th, 1992",
             "What is the capital of France?"]


def tunebook_answers(source):
    out = []
    for q in QUESTIONS:
        p = subprocess.run(["tunebook", "generate", "--model", source, "--chat", q, "--max-tokens", "16"], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"tunebook generate failed: {p.stderr}")
        out.append(p.stdout.strip())
    return out


def hf_answers(model, tok):
    import torch
    out = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt")
        if not torch.is_tensor(ids):
            ids = ids["input_ids"]
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=16, do_sample=False)
        out.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def main():
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, TUNEBOOK_HOME=os.path.join(d, "home"), TUNEBOOK_RUNS=os.path.join(d, "runs"))
        up = subprocess.run(["tunebook", "mlflow", "up", "--data-dir", os.path.join(d, "mlflow")], capture_output=True, text=True, check=True, env=env).stdout
        uri = next(l.split("=", 1)[1] for l in up.splitlines() if "export MLFLOW_TRACKING_URI=" in l).strip()
        env["MLFLOW_TRACKING_URI"] = uri
        os.environ.update(env)
        try:
            cfg = os.path.join(d, "run.toml")
            with open(cfg, "w") as f:
                f.write(f'model = {json.dumps(GGUF)}\ntrain_data = {json.dumps(os.path.join(ROOT, "data/sample/dates-train.jsonl"))}\n'
                        'name = "interop"\ntraining_duration = "10ba"\nlearning_rate = 1e-3\nwarmup_steps = 3\ncontext_length = 256\nbatch_size = 4\nregister_to = "main.interop.dates"\n'
                        '[lora]\nr = 8\nalpha = 16.0\ndropout = 0.0\n')
            subprocess.run(["tunebook", "train", cfg], check=True, env=env, capture_output=True)
            run = os.path.join(d, "runs", "interop")
            ours = tunebook_answers(os.path.join(run, "model"))
            print("tunebook on the run:      ", ours)

            import mlflow
            os.environ["HF_HUB_OFFLINE"] = "1"
            pipe = mlflow.transformers.load_model("models:/main.interop.dates/1")
            theirs = hf_answers(pipe.model, pipe.tokenizer)
            print("mlflow.transformers:      ", theirs)
            assert theirs == ours, "MLflow's transformers flavor answers differently"

            import transformers
            hf = os.path.join(d, "hf")
            subprocess.run(["tunebook", "export", run, "--hf", hf], check=True, capture_output=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(hf)
            tok = transformers.AutoTokenizer.from_pretrained(hf)
            exported = hf_answers(model, tok)
            print("transformers on --hf:     ", exported)
            assert exported == ours, "the merged Hugging Face export answers differently"
            print("OK: mlflow.transformers.load_model and transformers on the --hf export answer as tunebook does")
        finally:
            subprocess.run(["tunebook", "mlflow", "down", "--data-dir", os.path.join(d, "mlflow")], env=env)


if __name__ == "__main__":
    sys.exit(main())
