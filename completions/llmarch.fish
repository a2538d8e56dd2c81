# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_llmarch_global_optspecs
    string join \n q/quiet v/verbose allow-unknown-keys h/help V/version
end

function __fish_llmarch_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_llmarch_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_llmarch_using_subcommand
    set -l cmd (__fish_llmarch_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c llmarch -n "__fish_llmarch_needs_command" -s q -l quiet -d 'No progress bars or notes on stderr (errors are still printed)'
complete -c llmarch -n "__fish_llmarch_needs_command" -s v -l verbose -d 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
complete -c llmarch -n "__fish_llmarch_needs_command" -l allow-unknown-keys -d 'Treat config keys llmarch does not know as warnings instead of errors'
complete -c llmarch -n "__fish_llmarch_needs_command" -s h -l help -d 'Print help'
complete -c llmarch -n "__fish_llmarch_needs_command" -s V -l version -d 'Print version'
complete -c llmarch -n "__fish_llmarch_needs_command" -f -a "run" -d 'Generate once, streaming tokens to stdout, with the live KV panel on stderr'
complete -c llmarch -n "__fish_llmarch_needs_command" -f -a "chat" -d 'Interactive multi-turn chat with the model\'s own template, the KV cache kept across turns, and a context meter after each reply'
complete -c llmarch -n "__fish_llmarch_needs_command" -f -a "inspect" -d 'Architecture of a model: per-layer table and parameter counts'
complete -c llmarch -n "__fish_llmarch_needs_command" -f -a "kv-budget" -d 'KV-cache memory and attention budget, per model, context and layer'
complete -c llmarch -n "__fish_llmarch_needs_command" -f -a "models" -d 'The built-in model aliases and supported families'
complete -c llmarch -n "__fish_llmarch_needs_command" -f -a "completions" -d 'Shell completions (also committed under completions/)'
complete -c llmarch -n "__fish_llmarch_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -s p -l prompt -d 'The prompt text (BOS is added as the tokenizer config says)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l prompt-file -d 'Read the prompt from a file (`-` for stdin)' -r -F
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l prompt-ids -d 'Raw token ids instead of text, e.g. `2,651,1144`' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -s n -l max-new-tokens -d 'Tokens to generate at most (default: generation_config.json\'s, else 128)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l temperature -d '0 = greedy. Default: generation_config.json\'s when it samples, else 0' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l top-k -d 'Keep only the k most likely tokens' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l top-p -d 'Keep the smallest set of tokens whose probability reaches p' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l min-p -d 'Drop tokens less likely than min-p × the most likely one' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l repeat-penalty -d '> 1 makes tokens already in the sequence less likely' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l seed -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l dtype -d 'Weight type (default on the CPU: the checkpoint\'s own, e.g. bf16, read from the file without a copy; on a GPU: bf16)' -r -f -a "f32\t'f32 weights (CPU: widened from the checkpoint at load)'
bf16\t'bfloat16 weights (GPU: activations and KV cache too)'
f16\t'float16 weights (GPU: activations and KV cache too)'
q8_0\t'weight matrices quantized at load to GGML q8_0 (1.06 bytes per weight); CPU only'
q4_0\t'weight matrices quantized at load to GGML q4_0 (0.56 bytes per weight); CPU only'"
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l device -d 'Where the model runs (not with --endpoint: the server runs it)' -r -f -a "cpu\t''
cuda\t''
metal\t''
auto\t''"
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l draft -d 'Speculative decoding: `ngram` (prompt lookup: the continuation of the latest earlier match of the last tokens), `mtp` (the checkpoint\'s own multi-token-prediction layers), or a Gemma 4 assistant drafter (alias such as `gemma4-e2b-assistant`, Hub repo or folder). The output is the target\'s either way; only the speed changes' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l draft-tokens -d 'Tokens drafted per verify step (default: the assistant\'s `num_assistant_tokens` from its generation_config.json; 4 for ngram)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l max-context -d 'Context limit for this run and the budget the panel compares against (default: the model\'s own). A number of tokens, `k`/`m` binary suffixes allowed (128k = 131072)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l logits-out -d 'Write tensor `logits` [positions, vocab] f32: every prompt position, then each step' -r -F
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l endpoint -d 'An OpenAI-compatible server to generate with (vLLM, SGLang, llama.cpp\'s llama-server): `http://host:port` or `.../v1` (run: /v1/completions, chat: /v1/chat/completions), or the full URL of either. MODEL still gives the architecture (config.json only, no weights): the KV panel is computed from it for the token counts the server reports' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l api-key -d 'API key for --endpoint (default: $OPENAI_API_KEY); sent only to the endpoint, never printed' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l served-model -d 'The model name the server serves (default: the alias\'s or repo\'s id, else MODEL as given): vLLM\'s --served-model-name' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l endpoint-timeout -d 'Seconds a silent server may take to connect or to send the next bytes (a long prompt\'s prefill sends nothing until it ends)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l kv-dtype -d 'The server\'s KV cache element type, for the computed KV panel (--endpoint)' -r -f -a "f32\t''
bf16\t''
f16\t''
q8_0\t''
q4_0\t''"
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l draft-logits-out -d 'With an assistant `--draft`: write tensor `logits` [drafted, vocab] f32, the assistant\'s logits for every token it drafted, in the order drafted' -r -F
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l json -d 'Stats as one JSON object on the last stdout line'
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -s q -l quiet -d 'No progress bars or notes on stderr (errors are still printed)'
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -s v -l verbose -d 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -l allow-unknown-keys -d 'Treat config keys llmarch does not know as warnings instead of errors'
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmarch -n "__fish_llmarch_using_subcommand run" -s V -l version -d 'Print version'
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l system -d 'The system prompt' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l input -d 'Read the user messages from a file, one per line, instead of the terminal' -r -F
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -s n -l max-new-tokens -d 'Tokens to generate at most (default: generation_config.json\'s, else 128)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l temperature -d '0 = greedy. Default: generation_config.json\'s when it samples, else 0' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l top-k -d 'Keep only the k most likely tokens' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l top-p -d 'Keep the smallest set of tokens whose probability reaches p' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l min-p -d 'Drop tokens less likely than min-p × the most likely one' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l repeat-penalty -d '> 1 makes tokens already in the sequence less likely' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l seed -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l dtype -d 'Weight type (default on the CPU: the checkpoint\'s own, e.g. bf16, read from the file without a copy; on a GPU: bf16)' -r -f -a "f32\t'f32 weights (CPU: widened from the checkpoint at load)'
bf16\t'bfloat16 weights (GPU: activations and KV cache too)'
f16\t'float16 weights (GPU: activations and KV cache too)'
q8_0\t'weight matrices quantized at load to GGML q8_0 (1.06 bytes per weight); CPU only'
q4_0\t'weight matrices quantized at load to GGML q4_0 (0.56 bytes per weight); CPU only'"
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l device -d 'Where the model runs (not with --endpoint: the server runs it)' -r -f -a "cpu\t''
cuda\t''
metal\t''
auto\t''"
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l draft -d 'Speculative decoding: `ngram` (prompt lookup: the continuation of the latest earlier match of the last tokens), `mtp` (the checkpoint\'s own multi-token-prediction layers), or a Gemma 4 assistant drafter (alias such as `gemma4-e2b-assistant`, Hub repo or folder). The output is the target\'s either way; only the speed changes' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l draft-tokens -d 'Tokens drafted per verify step (default: the assistant\'s `num_assistant_tokens` from its generation_config.json; 4 for ngram)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l max-context -d 'Context limit of the conversation (default: the model\'s own). A number of tokens, `k`/`m` binary suffixes allowed (128k = 131072)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l thinking -d '`enable_thinking` for templates that take it (default: the template\'s own)' -r -f -a "on\t''
off\t''"
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l chat-template -d 'A chat template file, or a built-in one by name (`gemma-4-E2B-it`, `gemma-4-31B-it`, `Qwen3.6-27B`, `Laguna-XS.2`), instead of the model\'s own' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l snapshots -d 'KV-cache snapshots kept at turn boundaries for /undo, /regen and templates that rewrite earlier turns (each holds a copy of the cache as it was)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l endpoint -d 'An OpenAI-compatible server to generate with (vLLM, SGLang, llama.cpp\'s llama-server): `http://host:port` or `.../v1` (run: /v1/completions, chat: /v1/chat/completions), or the full URL of either. MODEL still gives the architecture (config.json only, no weights): the KV panel is computed from it for the token counts the server reports' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l api-key -d 'API key for --endpoint (default: $OPENAI_API_KEY); sent only to the endpoint, never printed' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l served-model -d 'The model name the server serves (default: the alias\'s or repo\'s id, else MODEL as given): vLLM\'s --served-model-name' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l endpoint-timeout -d 'Seconds a silent server may take to connect or to send the next bytes (a long prompt\'s prefill sends nothing until it ends)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l kv-dtype -d 'The server\'s KV cache element type, for the computed KV panel (--endpoint)' -r -f -a "f32\t''
bf16\t''
f16\t''
q8_0\t''
q4_0\t''"
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l context-shift -d 'When the context is full, drop the oldest turns instead of stopping'
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l hide-thinking -d 'Do not show the model\'s thinking (it is still kept in the transcript)'
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l no-history -d 'Do not read or write the input history file'
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -s q -l quiet -d 'No progress bars or notes on stderr (errors are still printed)'
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -s v -l verbose -d 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -l allow-unknown-keys -d 'Treat config keys llmarch does not know as warnings instead of errors'
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmarch -n "__fish_llmarch_using_subcommand chat" -s V -l version -d 'Print version'
complete -c llmarch -n "__fish_llmarch_using_subcommand inspect" -l draft -d 'Also describe a drafter for this model (`ngram`, or a Gemma 4 assistant: alias, Hub repo or folder): what it reads of the target\'s cache, and its own KV (none)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand inspect" -l json -d 'Machine-readable output on stdout'
complete -c llmarch -n "__fish_llmarch_using_subcommand inspect" -s q -l quiet -d 'No progress bars or notes on stderr (errors are still printed)'
complete -c llmarch -n "__fish_llmarch_using_subcommand inspect" -s v -l verbose -d 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
complete -c llmarch -n "__fish_llmarch_using_subcommand inspect" -l allow-unknown-keys -d 'Treat config keys llmarch does not know as warnings instead of errors'
complete -c llmarch -n "__fish_llmarch_using_subcommand inspect" -s h -l help -d 'Print help'
complete -c llmarch -n "__fish_llmarch_using_subcommand inspect" -s V -l version -d 'Print version'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -s c -l context -d 'Context lengths: a comma-separated list of numbers with an optional k/m suffix (binary: 128k = 131072, 1m = 1048576)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l kv-dtype -d 'Element type of the cached keys and values. States that the config keeps in f32 stay f32' -r -f -a "f32\t''
bf16\t''
f16\t''
q8_0\t''
q4_0\t''"
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l batch -d 'Sequences cached at once (1 to 1048576)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l gpu -d 'GPUs for --fit: NAME[:N[xNODES]] (`h200:8`, `a100-80g:4x2` = 4 per node × 2 nodes) or a memory size (`96GiB:4`, `80GB`). Names: h100 (h100-80g), h100-nvl, h200, b200, a100-40g, a100-80g, l40s, l4, rtx4090, rtx5090, rtx6000-ada, mi300x, mi325x, with the memory the driver reports (AMD: nominal)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l engine -d 'The engine whose plan --fit makes' -r -f -a "vllm\t''
sglang\t''"
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l weights -d 'The format the engine holds the weights in (--fit). Embedding tables and the output head stay bf16 in the quantized formats' -r -f -a "as-shipped\t'The checkpoint\'s own format: its dtype, or DeepSeek V4\'s FP8 with FP4 routed experts'
bf16\t''
fp8\t'1 byte per weight (block scales, under 0.03 %, not counted)'
fp4\t'e2m1 with one 1-byte scale per 32 weights (MXFP4, as DeepSeek V4\'s experts): 17/32 byte'
q8_0\t'GGML blocks of 32 with an f16 scale: 34/32 byte'
q4_0\t'GGML blocks of 32 with an f16 scale: 18/32 byte'"
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l tp -d 'Pin the tensor-parallel size (--fit); default: the largest the model and a node take' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l pp -d 'Pin the pipeline-parallel size (--fit); default: the GPUs TP leaves' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l mem-fraction -d 'The engine\'s share of each GPU (--fit): vLLM\'s --gpu-memory-utilization (default 0.9), SGLang\'s --mem-fraction-static (default 0.85 here; SGLang picks its own at start)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l headroom -d 'Activation headroom per GPU (--fit): a size such as 2GiB or 500MB' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l draft -d 'With one model: a drafter for it (`ngram`, or a Gemma 4 assistant: alias, Hub repo or folder); its own KV (none: it reads the target\'s) is added to each figure' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l per-layer -d 'One row per layer (identical neighbours folded) with bytes and attention FLOPs'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l explain -d 'Show the formula with the numbers filled in, for one layer of each kind'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l json -d 'Machine-readable output on stdout: an array, one object per model and context'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l fit -d 'Plan serving on --gpu with vLLM or SGLang: whether each model fits at each context × --batch, with which split (tensor, pipeline, expert parallel), weights, KV and headroom per GPU, and the largest context and batch that fit'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -s q -l quiet -d 'No progress bars or notes on stderr (errors are still printed)'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -s v -l verbose -d 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l allow-unknown-keys -d 'Treat config keys llmarch does not know as warnings instead of errors'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -s V -l version -d 'Print version'
complete -c llmarch -n "__fish_llmarch_using_subcommand models" -l json -d 'Machine-readable output on stdout'
complete -c llmarch -n "__fish_llmarch_using_subcommand models" -s q -l quiet -d 'No progress bars or notes on stderr (errors are still printed)'
complete -c llmarch -n "__fish_llmarch_using_subcommand models" -s v -l verbose -d 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
complete -c llmarch -n "__fish_llmarch_using_subcommand models" -l allow-unknown-keys -d 'Treat config keys llmarch does not know as warnings instead of errors'
complete -c llmarch -n "__fish_llmarch_using_subcommand models" -s h -l help -d 'Print help'
complete -c llmarch -n "__fish_llmarch_using_subcommand models" -s V -l version -d 'Print version'
complete -c llmarch -n "__fish_llmarch_using_subcommand completions" -s q -l quiet -d 'No progress bars or notes on stderr (errors are still printed)'
complete -c llmarch -n "__fish_llmarch_using_subcommand completions" -s v -l verbose -d 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
complete -c llmarch -n "__fish_llmarch_using_subcommand completions" -l allow-unknown-keys -d 'Treat config keys llmarch does not know as warnings instead of errors'
complete -c llmarch -n "__fish_llmarch_using_subcommand completions" -s h -l help -d 'Print help'
complete -c llmarch -n "__fish_llmarch_using_subcommand completions" -s V -l version -d 'Print version'
complete -c llmarch -n "__fish_llmarch_using_subcommand help; and not __fish_seen_subcommand_from run chat inspect kv-budget models completions help" -f -a "run" -d 'Generate once, streaming tokens to stdout, with the live KV panel on stderr'
complete -c llmarch -n "__fish_llmarch_using_subcommand help; and not __fish_seen_subcommand_from run chat inspect kv-budget models completions help" -f -a "chat" -d 'Interactive multi-turn chat with the model\'s own template, the KV cache kept across turns, and a context meter after each reply'
complete -c llmarch -n "__fish_llmarch_using_subcommand help; and not __fish_seen_subcommand_from run chat inspect kv-budget models completions help" -f -a "inspect" -d 'Architecture of a model: per-layer table and parameter counts'
complete -c llmarch -n "__fish_llmarch_using_subcommand help; and not __fish_seen_subcommand_from run chat inspect kv-budget models completions help" -f -a "kv-budget" -d 'KV-cache memory and attention budget, per model, context and layer'
complete -c llmarch -n "__fish_llmarch_using_subcommand help; and not __fish_seen_subcommand_from run chat inspect kv-budget models completions help" -f -a "models" -d 'The built-in model aliases and supported families'
complete -c llmarch -n "__fish_llmarch_using_subcommand help; and not __fish_seen_subcommand_from run chat inspect kv-budget models completions help" -f -a "completions" -d 'Shell completions (also committed under completions/)'
complete -c llmarch -n "__fish_llmarch_using_subcommand help; and not __fish_seen_subcommand_from run chat inspect kv-budget models completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
