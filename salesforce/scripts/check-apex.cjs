// Parses every Apex class and trigger under the given directories with an offline Apex grammar
// (@apexdevtools/apex-parser, the ANTLR grammar that aims to match the platform compiler) and
// prints each syntax error as file:line:column. Exits 1 if any file has one, or if no file was
// found (a check of nothing passes nothing).
//
// Apex compiles and runs only in a Salesforce org: the Apex tests (classes/*Test.cls) need one
// (`sf apex run test`, salesforce/README.md). This catches what a deploy would reject first,
// on every CI run, without an org.
"use strict";
const fs = require("fs");
const path = require("path");
const { ApexParserFactory, ApexErrorListener } = require("@apexdevtools/apex-parser");

function apexFiles(dir) {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) return apexFiles(full);
    return /\.(cls|trigger)$/.test(entry.name) ? [full] : [];
  });
}

const files = process.argv.slice(2).flatMap(apexFiles);
if (files.length === 0) {
  console.error("no Apex classes or triggers found under", process.argv.slice(2).join(" "));
  process.exit(1);
}
let errors = 0;
for (const file of files) {
  class Listener extends ApexErrorListener {
    apexSyntaxError(line, column, message) {
      errors += 1;
      console.error(`${file}:${line}:${column}: ${message}`);
    }
  }
  const { parser } = ApexParserFactory.createLexerAndParser(
    fs.readFileSync(file, "utf8"),
    new Listener()
  );
  if (file.endsWith(".trigger")) parser.triggerUnit();
  else parser.compilationUnit();
}
console.log(`${files.length} Apex files parsed, ${errors} syntax errors`);
process.exit(errors === 0 ? 0 : 1);
