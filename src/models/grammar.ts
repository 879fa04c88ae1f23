// Structured output (issue 15): turns a client's JSON schema (response_format json_schema, a tool's
// parameters) into the subset node-llama-cpp compiles to a GBNF grammar, refusing what the grammar cannot
// enforce instead of silently loosening it. Pure: the gateway and the sealed worker both check a request
// with it; the worker (src/models/llama.ts) compiles the result.
import { PhantomaError, ERRORS } from '../errors.ts';

/** A JSON schema in node-llama-cpp's grammar subset (GbnfJsonSchema), as plain JSON. */
export type GrammarSchema = Record<string, unknown>;

/** Keywords the grammar enforces; `anyOf` becomes `oneOf` (the grammar produces exactly one branch). */
const ENFORCED = new Set([
  'type', 'const', 'enum', 'oneOf', 'anyOf', 'properties', 'additionalProperties', 'required', 'minProperties', 'maxProperties',
  'items', 'prefixItems', 'minItems', 'maxItems', 'minLength', 'maxLength', 'format', '$defs', '$ref',
]);
/** Annotations that constrain nothing. */
const ANNOTATIONS = new Set(['description', 'title', '$schema', '$id', '$comment', 'examples', 'default']);
const FORMATS = new Set(['date-time', 'time', 'date']);
const MAX_DEPTH = 32;

function refuse(param: string, why: string): never {
  throw new PhantomaError(ERRORS.UNSUPPORTED_PARAMETER, `${param}: ${why}`, { details: { param } });
}

function convert(node: unknown, param: string, path: string, depth: number): GrammarSchema {
  if (depth > MAX_DEPTH) refuse(param, `the schema nests deeper than ${MAX_DEPTH} levels`);
  if (typeof node !== 'object' || node === null || Array.isArray(node)) refuse(param, `${path || 'the schema'} must be a JSON-schema object`);
  const out: GrammarSchema = {};
  for (const [key, value] of Object.entries(node as Record<string, unknown>)) {
    const at = `${path}/${key}`;
    if (ANNOTATIONS.has(key)) {
      if (key === 'description' && typeof value === 'string') out.description = value;
      continue;
    }
    if (!ENFORCED.has(key)) refuse(param, `the keyword "${key}" (at ${at}) cannot be enforced by the grammar`);
    switch (key) {
      case 'properties':
      case '$defs': {
        if (typeof value !== 'object' || value === null || Array.isArray(value)) refuse(param, `${at} must be an object`);
        out[key] = Object.fromEntries(Object.entries(value).map(([k, v]) => [k, convert(v, param, `${at}/${k}`, depth + 1)]));
        break;
      }
      case 'items':
      case 'additionalProperties':
        out[key] = typeof value === 'boolean' && key === 'additionalProperties' ? value : convert(value, param, at, depth + 1);
        break;
      case 'oneOf':
      case 'anyOf':
      case 'prefixItems': {
        if (!Array.isArray(value) || value.length === 0) refuse(param, `${at} must be a non-empty array`);
        out[key === 'anyOf' ? 'oneOf' : key] = value.map((v, i) => convert(v, param, `${at}/${i}`, depth + 1));
        break;
      }
      case 'format':
        if (typeof value !== 'string' || !FORMATS.has(value)) refuse(param, `the format ${JSON.stringify(value)} (at ${at}) cannot be enforced (date-time, time, date can)`);
        out[key] = value;
        break;
      case '$ref':
        if (typeof value !== 'string' || !/^#\/\$defs\/[^/]+$/.test(value)) refuse(param, `only "#/$defs/<name>" references are supported (at ${at})`);
        out[key] = value;
        break;
      default:
        out[key] = value;
    }
  }
  if (Object.keys(out).filter((k) => k !== 'description').length === 0) refuse(param, `${path || 'the schema'} constrains nothing (give a type, enum, const or oneOf)`);
  return out;
}

/** The grammar subset of a client's schema, or an `unsupported_parameter` refusal naming `param`. */
export function grammarSchema(schema: unknown, param: string): GrammarSchema {
  return convert(schema, param, '', 0);
}

/** What a forced tool call looks like: `{"name": "<declared>", "arguments": {…}}`, one branch per function. */
export function toolCallSchema(tools: ReadonlyArray<{ name: string; parameters: GrammarSchema }>): GrammarSchema {
  const branch = (t: { name: string; parameters: GrammarSchema }): GrammarSchema => ({
    type: 'object',
    properties: { name: { const: t.name }, arguments: t.parameters },
    required: ['name', 'arguments'],
    additionalProperties: false,
  });
  return tools.length === 1 ? branch(tools[0]!) : { oneOf: tools.map(branch) };
}

/** A function without declared parameters takes an empty object. */
export const NO_PARAMETERS: GrammarSchema = Object.freeze({ type: 'object', properties: {}, additionalProperties: false });
