// Test helper process: loads the tiny model with node-llama-cpp and prints one completion's text as JSON.
import { createLogger } from '../../src/logger.ts';
import { createLlamaRuntime, loadModelFile, createContext, generateCompletion } from '../../src/models/llama.ts';
import { tinyModelPath } from '../helpers.ts';

const rt = await createLlamaRuntime({ logger: createLogger({ level: 'silent' }) });
const { model } = await loadModelFile(rt, await tinyModelPath());
const context = await createContext(model, { contextSize: 512, threads: 2, batchSize: 128 });
const r = await generateCompletion(context, 'the world is', { maxTokens: 24, seed: 9, temperature: 0.8 });
process.stdout.write(JSON.stringify({ text: r.text, tokens: r.tokens }) + '\n');
process.exit(0);
